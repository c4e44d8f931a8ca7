-- `make demo` is the newcomer's first command: it must keep working. The demo checks itself
-- (a full rolling restart under load, with three replicas behind a real HAProxy and wrk through
-- it, then a broken deploy rolled back, everything healthy at the end) and exits non-zero when
-- anything is off: a failed request or a budget exceeded during the roll included. Its second
-- part (demo/hosts.lua) rolls one platform across two test hosts, each a real sshd and its own
-- user manager, with dependencies across them.
local proc = require("rr.proc")
local fs = require("rr.fs")

describe("make demo", function()
  it("runs end to end: a rolling restart under load with no failed request, then a broken deploy rolled back", function()
    local res, err, _, r = proc.run({ "./demo/run" }, { timeout = 240 })
    res = res or r
    assert.is_truthy(res, err)
    local out = (res.stdout or "") .. (res.stderr or "")
    assert.equal(0, res.exit_code, out)
    assert.matches("Demo done", res.stdout)
    -- the roll under load: wrk's count, none failed, the replicas drained and put back one by one
    local requests = tonumber(res.stdout:match("(%d+) requests during the roll, 0 failed %(non%-2xx 0, socket errors 0%)"))
    assert.is_truthy(requests, out)
    assert.is_true(requests > 0, out)
    assert.matches("the budget held: at most 1 of 3 replicas out of service at once %(1%)", res.stdout)
    for i = 1, 3 do
      assert.matches("demo%-api%-" .. i .. " +drained at HAProxy", res.stdout)
      assert.matches("demo%-api%-" .. i .. " +back in rotation", res.stdout)
    end
    assert.matches("rolled back, healthy again", res.stdout)
    -- what it started outside the sandbox is gone: HAProxy (its master) by the PID it printed
    local haproxy = res.stdout:match("HAProxy %(pid (%d+)%)")
    assert.is_truthy(haproxy, out)
    assert.is_false(fs.exists("/proc/" .. haproxy), "HAProxy (pid " .. haproxy .. ") still runs")
  end)

  it("its second part rolls a platform across two hosts: both named, the order across them kept", function()
    local res, err, _, r = proc.run({ "./rrengine", "demo/hosts.lua" }, { timeout = 120 })
    res = res or r
    assert.is_truthy(res, err)
    local out = (res.stdout or "") .. (res.stderr or "")
    assert.equal(0, res.exit_code, out)
    assert.matches("Two%-host demo done", res.stdout)
    -- each progress line names its host in a column; the first line matching pattern
    local lines = {}
    for line in res.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
    local function at(pattern)
      for i, line in ipairs(lines) do
        if line:match("^%d%d:%d%d:%d%d%.%d%d%d  " .. pattern) then return i end
      end
      error(("no line %q in:\n%s"):format(pattern, out))
    end
    -- the order across hosts: db (h1) done before api (h2) starts; api (h2) and queue (h1)
    -- done before worker (h2) starts
    assert.is_true(at("h1  ✔ demo%-db%s+restart ok") < at("h2  demo%-api%s+inspect"))
    assert.is_true(at("h2  ✔ demo%-api%s+restart ok") < at("h2  demo%-worker%s+inspect"))
    assert.is_true(at("h1  ✔ demo%-queue%s+restart ok") < at("h2  demo%-worker%s+inspect"))
    assert.matches("h1 %d/2%]", res.stdout)
    assert.matches("%[4/4, h2 2/2%]", res.stdout)
    assert.matches("✔ demo%-db %(h1%) was active again before demo%-api %(h2%) restarted", res.stdout)
    assert.matches("✔ demo%-api %(h2%) and demo%-queue %(h1%) before demo%-worker %(h2%)", res.stdout)
    assert.matches("both hosts stopped", res.stdout)
  end)
end)
