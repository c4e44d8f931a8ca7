-- Health checks (healthy, not ready, unhealthy; deadline, retries, unit signals), against real
-- fixture services in the sandbox.
local rr = require("rr")
local health = require("rr.health")
local units = require("spec.support.units")
local platform = require("spec.support.platform")

describe("health.classify", function()
  it("sorts every answer into healthy, not ready or unhealthy", function()
    assert.equal("healthy", (health.classify({ status = 200, body = "ok" })))
    assert.equal("healthy", (health.classify({ status = 204, body = "" })))
    assert.equal("not_ready", (health.classify({ status = 503, body = "" })))
    assert.equal("not_ready", (health.classify(nil, "connection refused", "refused")))
    assert.equal("unhealthy", (health.classify({ status = 500, body = "" })))
    assert.equal("unhealthy", (health.classify({ status = 302, body = "" })))
    assert.equal("unhealthy", (health.classify(nil, "timed out after 1.0 s", "timeout")))
    assert.equal("unhealthy", (health.classify({ status = 200, body = "degraded" }, nil, nil, "ok")))
    assert.equal("healthy", (health.classify({ status = 200, body = "all ok" }, nil, nil, "ok")))
  end)
end)

describe("health.check", function()
  local m = platform.manager()
  local started = {}

  local function fixture(opts)
    local name = ("rrhc-%d-%d.service"):format(require("rr.fs").getpid(), #started + 1)
    local port = units.free_port()
    local _, url = units.fixture_unit(name, port, opts)
    assert(m:daemon_reload())
    local u = m:unit(name)
    assert(u:start())
    started[#started + 1] = name
    return u, { kind = "http", url = url, timeout = 5, retries = 2, interval = 0.2 }
  end

  teardown(function()
    for _, name in ipairs(started) do
      m:unit(name):stop()
      units.remove(name)
    end
    m:daemon_reload()
  end)

  it("waits through 503 (warming up) without counting it as unhealthy", function()
    local u, hc = fixture({ warmup = 0.6 })
    local ok, info = health.check(u, hc)
    assert.is_true(ok, info)
    assert.is_true(info.probes > hc.retries + 1, "503s were not probed repeatedly")
  end)

  it("waits through connection refused while the service has not bound its port", function()
    local u, hc = fixture({ listen_delay = 0.4 })
    assert.is_true((health.check(u, hc)))
  end)

  it("fails early after retries + 1 unhealthy answers in a row, long before the deadline", function()
    local u, hc = fixture({ status = 500 })
    hc.timeout = 30
    local t0 = rr.now()
    local ok, why = health.check(u, hc)
    assert.is_nil(ok)
    assert.matches("HTTP 500 %(3 answers in a row%)", why)
    assert.is_true(rr.now() - t0 < 5)
  end)

  it("counts a probe that hangs on an accepted connection as unhealthy", function()
    local u, hc = fixture({ hang = true })
    hc.retries = 0
    local ok, why = health.check(u, hc)
    assert.is_nil(ok)
    assert.matches("timed out", why)
  end)

  it("fails at the deadline when the service never becomes ready", function()
    local u, hc = fixture({ warmup = 30 })
    hc.timeout = 0.5
    local ok, why = health.check(u, hc)
    assert.is_nil(ok)
    assert.matches("not healthy after 0.5s", why)
  end)

  it("fails at once when the unit exits during the check (a signal, not a probe)", function()
    local u, hc = fixture({ warmup = 30, exit_after = 0.3 })
    hc.timeout = 20
    local t0 = rr.now()
    local ok, why = health.check(u, hc)
    assert.is_nil(ok)
    assert.matches("unit is ", why)
    assert.is_true(rr.now() - t0 < 5)
  end)

  -- A unit that stays "activating": Type=notify, and its process never says READY=1.
  local function activating()
    local name = ("rrhc-%d-%d.service"):format(require("rr.fs").getpid(), #started + 1)
    units.write(name, { type = "notify", exec = { "/bin/sleep", "1000" } })
    assert(m:daemon_reload())
    local u = assert(m:unit(name))
    started[#started + 1] = name
    -- the start job goes on in systemd after this wait gives up
    local ok, _, code = u:start({ timeout = 0.1 })
    assert.is_nil(ok)
    assert.equal("ETIMEDOUT", code)
    assert.equal("activating", u:get("ActiveState"))
    return u
  end

  it("health = systemd at its deadline names the state the unit is stuck in", function()
    local u = activating()
    local ok, why = health.check(u, { kind = "systemd", timeout = 1, retries = 0, interval = 1 })
    assert.is_nil(ok)
    assert.equal("unit still activating after 1s", why)
  end)

  it("an HTTP check of a unit stuck activating fails at its deadline with the last answer", function()
    local u = activating()
    local ok, why = health.check(u, { kind = "http", url = ("http://127.0.0.1:%d/health"):format(units.free_port()),
      timeout = 1, retries = 0, interval = 0.2 })
    assert.is_nil(ok)
    assert.equal("not healthy after 1s (last answer: connection refused)", why)
  end)

  -- A second connection, closed while the check waits on it: the wait fails with a D-Bus
  -- error ("closed"), which the check reports as such (not as a state, not as a timeout).
  local function closed_while_waiting(u_on_main, hc)
    local m2 = assert(require("rr.systemd").user())
    local u = assert(m2:unit(u_on_main:name()))
    local closer = rr.spawn(function()
      rr.sleep(0.2)
      m2:close()
    end)
    local ok, why = health.check(u, hc)
    rr.wait(closer)
    return ok, why
  end

  it("health = systemd reports a D-Bus error while it waits as a D-Bus error", function()
    local u = activating()
    local ok, why = closed_while_waiting(u, { kind = "systemd", timeout = 30, retries = 0, interval = 1 })
    assert.is_nil(ok)
    assert.equal(("cannot watch %s: the connection to the user manager was closed (closed)"):format(u:name()), why)
  end)

  it("an HTTP check reports a D-Bus error of its unit watch at once, not at the deadline", function()
    local u, hc = fixture({ warmup = 60 })
    hc.timeout = 30
    local ok, why = closed_while_waiting(u, hc)
    assert.is_nil(ok)
    assert.equal(("cannot watch %s: the connection to the user manager was closed (closed)"):format(u:name()), why)
  end)

  it("health = systemd passes when the unit is active and fails when it is not", function()
    local u = fixture({})
    assert.is_true((health.check(u, { kind = "systemd", timeout = 2, retries = 0, interval = 1 })))
    assert(u:stop())
    local ok, why = health.check(u, { kind = "systemd", timeout = 2, retries = 0, interval = 1 })
    assert.is_nil(ok)
    assert.matches("inactive", why)
  end)
end)
