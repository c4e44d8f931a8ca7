-- systemd's own check of a changed definition: a typo that systemd would only warn about
-- (and then run without) is refused before the daemon-reload, the service untouched.
local fs = require("rr.fs")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")
local snapshot = require("rr.snapshot")

describe("a changed definition that does not verify", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true } })
    p:start()
    local first = p:cli({})
    assert.equal(0, first.exit_code, first.stdout .. first.stderr) -- the definition is known good
  end)
  teardown(function() p:teardown() end)

  it("is refused: exit 1, the verifier's line in the output, the unit untouched, the known good kept", function()
    local known = assert(snapshot.known_good(p.state_root, "api"))
    local pid = p:props("api").MainPID
    local good = fs.read(p.by_name.api.unit_path)
    helpers.edit(p.by_name.api.unit_path, "%[Service%]", "[Service]\nExecStrat=oops")
    local res = p:cli({})
    assert.equal(1, res.exit_code, res.stdout .. res.stderr)
    assert.matches("does not pass systemd%-analyze verify: [^\n]*Unknown key 'ExecStrat'", res.stdout)
    assert.equal(pid, p:props("api").MainPID, "the unit was restarted")
    local ev = assert(p:last_event("SERVICE_RESTART_FAILED", "api"))
    assert.is_false(ev.touched)
    assert.equal(known.dir, assert(snapshot.known_good(p.state_root, "api")).dir)
    -- fixed: the run goes on
    assert(fs.write_atomic(p.by_name.api.unit_path, good))
    local again = p:cli({})
    assert.equal(0, again.exit_code, again.stdout .. again.stderr)
  end)
end)
