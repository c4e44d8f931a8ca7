-- `make demo` is the newcomer's first command: it must keep working. The demo checks itself
-- (a full rolling restart, a broken deploy rolled back, everything healthy at the end) and
-- exits non-zero when anything is off.
local proc = require("rr.proc")

describe("make demo", function()
  it("runs end to end: a rolling restart, then a broken deploy rolled back automatically", function()
    local res, err, _, r = proc.run({ "./demo/run" }, { timeout = 240 })
    res = res or r
    assert.is_truthy(res, err)
    assert.equal(0, res.exit_code, (res.stdout or "") .. (res.stderr or ""))
    assert.matches("Demo done", res.stdout)
    assert.matches("rolled back, healthy again", res.stdout)
  end)
end)
