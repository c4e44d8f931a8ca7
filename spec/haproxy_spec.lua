-- Specs for rr.haproxy and rr.balancer against a real HAProxy (Debian's haproxy, started by
-- spec/support/haproxy.lua) in front of real fixture servers, under real load (Debian's wrk).
--   spec/support/run-specs ./rrengine spec/haproxy_spec.lua
--
-- The last part is the point of draining: wrk runs through HAProxy while a server is killed.
-- Killed after a drain (sessions at 0), no request fails; killed while in rotation, the
-- requests it had in flight fail. That second half depends on HAProxy's configuration, which
-- the spec states: `retries 3` and `option redispatch 1` re-send a request whose *connection*
-- to the dead server fails (so only the requests already sent to it fail), and `retry-on` keeps
-- its default, `conn-failure`. With `retry-on all-retryable-errors` HAProxy would replay the
-- lost GETs on another server and hide the kill (measured: 0 failures without a drain); that
-- replays non-idempotent requests too, which is why it is no substitute for a drain.
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local http = require("rr.http")
local haproxy = require("rr.haproxy")
local balancer = require("rr.balancer")
local hx = require("spec.support.haproxy")
local helpers = require("spec.support.helpers")

-- HAProxy tells its counters only when asked: helpers.eventually polls them.
local eventually = helpers.eventually

local function url(h)
  return "http://127.0.0.1:" .. h.port .. "/health"
end

describe("rr.haproxy", function()
  local f, h, hp, slow, hang

  setup(function()
    f = { hx.fixture({ "--delay-ms", "20" }), hx.fixture({ "--delay-ms", "20" }), hx.fixture({ "--delay-ms", "20" }) }
    hang = hx.fixture({ "--hang" })
    h = hx.start({
      servers = { { name = "s1", port = f[1].port }, { name = "s2", port = f[2].port },
                  { name = "s3", port = f[3].port } },
      check = true,
      user_socket = true,
      ports = 1,
      -- a second backend whose one server never answers: its sessions never end
      extra = function(ports)
        return table.concat({
          "frontend fe_slow",
          "  bind 127.0.0.1:" .. ports[1],
          "  default_backend slow",
          "backend slow",
          "  server stuck 127.0.0.1:" .. hang.port,
        }, "\n")
      end,
    })
    hp = assert(haproxy.new({ socket = h.socket, backend = "app" }))
    slow = assert(haproxy.new({ socket = h.socket, backend = "slow" }))
  end)

  teardown(function()
    if h then h:stop() end
    for _, s in ipairs(f or {}) do s:stop() end
    if hang then hang:stop() end
  end)

  before_each(function()
    -- every server in rotation again, whatever a failed spec left
    for _, s in ipairs({ "s1", "s2", "s3" }) do
      assert(hp:ready(s))
      assert(hp:set_weight(s, "100%"))
    end
    assert(eventually(function()
      for _, st in pairs(assert(hp:stats())) do
        if st.status ~= "UP" then return false end
      end
      return true
    end), "the servers' health checks never passed")
  end)

  it("reads a server's state", function()
    local st = assert(hp:state("s2"))
    assert.equal("s2", st.name)
    assert.equal("ready", st.admin)
    assert.equal("UP", st.status)
    assert.equal("running", st.operational)
    assert.equal(0, st.sessions)
    assert.equal(0, st.queued)
    assert.equal(1, st.weight)
    assert.equal(1, st.initial_weight)
    assert.equal("L7OK", st.check)
    local all = assert(hp:servers())
    assert.same({ "s1", "s2", "s3" }, (function()
      local names = {}
      for name in pairs(all) do names[#names + 1] = name end
      table.sort(names)
      return names
    end)())
  end)

  it("drains a server under a real wrk load: its sessions reach 0, it gets no new ones, ready brings traffic back", function()
    local load = hx.wrk(url(h), 2, 4)
    local seen = 0
    assert.is_true(eventually(function()
      seen = assert(hp:stats()).s1.sessions
      return seen > 0
    end), "s1 never had a session under load")
    assert.is_true(hp:drain("s1"))
    local ok, st = hp:wait_drained("s1", 5)
    assert.is_true(ok)
    assert.equal(0, st.sessions)
    local drained = assert(hp:state("s1"))
    assert.equal("drain", drained.admin)
    assert.equal("DRAIN", drained.status)
    local served = drained.total
    local before = assert(hp:stats())
    local r = load:wait()
    local after = assert(hp:stats())
    assert.equal(before.s1.total, after.s1.total, "a drained server got new sessions")
    assert.is_true(after.s2.total + after.s3.total > before.s2.total + before.s3.total)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.is_true(served > 0)

    assert.is_true(hp:ready("s1"))
    assert.equal("ready", assert(hp:state("s1")).admin)
    hx.wrk(url(h), 1, 4):wait()
    assert.is_true(assert(hp:stats()).s1.total > after.s1.total, "s1 got no traffic after ready")
  end)

  it("times out a drain while a request is still in flight, saying how many sessions are left", function()
    local stuck = rr.spawn(function() return http.get("http://127.0.0.1:" .. h.ports[1] .. "/health", { timeout = 30 }) end)
    assert.is_true(eventually(function() return assert(slow:stats()).stuck.sessions == 1 end))
    assert.is_true(slow:drain("stuck"))
    local ok, err, code, st = slow:wait_drained("stuck", 0.2)
    assert.is_nil(ok)
    assert.equal("slow/stuck still has 1 session(s) and 0 queued after 0.2 s", err)
    assert.equal("ETIMEDOUT", code)
    assert.equal(1, st.sessions)
    stuck:cancel()
    rr.wait(stuck)
    assert.is_true(slow:ready("stuck"))
  end)

  it("sets weights: 0 takes a server out of the rotation, 100% gives back its initial weight", function()
    assert.is_true(hp:set_weight("s3", 0))
    local st = assert(hp:state("s3"))
    assert.equal(0, st.weight)
    assert.equal("ready", st.admin)
    local before = st.total
    local r = hx.wrk(url(h), 1, 4):wait()
    assert.equal(0, r.non2xx, r.output)
    assert.equal(before, assert(hp:state("s3")).total, "a server of weight 0 got new sessions")
    assert.is_true(hp:set_weight("s3", "100%"))
    assert.equal(1, assert(hp:state("s3")).weight)
    assert.is_true(hp:set_weight("s3", 7))
    assert.equal(7, assert(hp:state("s3")).weight)
  end)

  it("says ENOENT for a server the backend does not have, and changes nothing", function()
    local ok, err, code = hp:drain("nope")
    assert.is_nil(ok)
    assert.equal("HAProxy at " .. h.socket .. ": set server app/nope state drain: No such server.", err)
    assert.equal("ENOENT", code)
    local st
    st, err, code = hp:state("nope")
    assert.is_nil(st)
    assert.equal("HAProxy at " .. h.socket .. ": backend app has no server nope", err)
    assert.equal("ENOENT", code)
    assert.same({ nil, err, "ENOENT" }, { hp:wait_drained("nope", 1) })
    for _, s in pairs(assert(hp:servers())) do assert.equal("ready", s.admin) end
  end)

  it("says ENOBACKEND for a backend HAProxy does not have", function()
    local other = assert(haproxy.new({ socket = h.socket, backend = "nope" }))
    local ok, err, code = other:drain("s1")
    assert.is_nil(ok)
    assert.equal("HAProxy at " .. h.socket .. ": set server nope/s1 state drain: No such backend.", err)
    assert.equal("ENOBACKEND", code)
    local _, _, code2 = other:state("s1")
    assert.equal("ENOBACKEND", code2)
  end)

  it("says ENOENT, clearly, when the admin socket is missing", function()
    local path = h.dir .. "/missing.sock"
    local other = assert(haproxy.new({ socket = path, backend = "app" }))
    local ok, err, code = other:drain("s1")
    assert.is_nil(ok)
    assert.equal("cannot reach HAProxy: cannot connect to unix:" .. path .. ": No such file or directory (is HAProxy running, with `stats socket "
      .. path .. " level admin`?)", err)
    assert.equal("ENOENT", code)
    assert.same({ nil, err, "ENOENT" }, { other:state("s1") })
  end)

  it("reads but cannot change through a socket at level user: EPERM", function()
    local user = assert(haproxy.new({ socket = h.user_socket, backend = "app" }))
    assert.equal("ready", assert(user:state("s1")).admin)
    local ok, err, code = user:drain("s1")
    assert.is_nil(ok)
    assert.equal("HAProxy at " .. h.user_socket .. ": set server app/s1 state drain: Permission denied", err)
    assert.equal("EPERM", code)
    assert.equal("ready", assert(hp:state("s1")).admin)
  end)

  it("passes HAProxy's own refusal on as EHAPROXY", function()
    local ok, err, code = hp:set_weight("s1", 300)
    assert.is_nil(ok)
    assert.matches("set weight app/s1 300: Absolute weight can only be between 0 and 256 inclusive.", err, 1, true)
    assert.equal("EHAPROXY", code)
  end)

  it("refuses a name that would smuggle another command in: EINVAL, nothing sent", function()
    local ok, err, code = hp:drain("s1 state maint;set server app/s2")
    assert.is_nil(ok)
    assert.matches("letters, digits", err)
    assert.equal("EINVAL", code)
    local other, err2, code2 = haproxy.new({ socket = h.socket, backend = "a b" })
    assert.is_nil(other)
    assert.matches("letters, digits", err2)
    assert.equal("EINVAL", code2)
    for _, s in pairs(assert(hp:servers())) do assert.equal("ready", s.admin) end
  end)

  it("puts a server in maintenance and reports it", function()
    assert.is_true(hp:maint("s2"))
    local st = assert(hp:state("s2"))
    assert.equal("maint", st.admin)
    assert.equal("MAINT", st.status)
  end)

  it("raises on misuse", function()
    assert.has_error(function() haproxy.new() end)
    assert.has_error(function() haproxy.new({ socket = h.socket }) end)
    assert.has_error(function() hp:set_weight("s1", -1) end)
    assert.has_error(function() hp:set_weight("s1", "half") end)
    assert.has_error(function() hp:command("show info\nshow stat") end)
    assert.has_error(function() hp:wait_drained("s1") end)
  end)
end)

-- HAProxy looks `show stat NAME` up among frontends too: with a frontend of the backend's name
-- (a common habit: `frontend api` / `backend api`), the answer was the frontend's, without a
-- server row, and a drain wait had nothing to wait for.
describe("rr.haproxy with a frontend of the backend's name", function()
  local f, h, hp

  setup(function()
    f = hx.fixture()
    h = hx.start({
      servers = { { name = "other", port = f.port } },
      ports = 1,
      extra = function(ports)
        return table.concat({
          "frontend api",
          "  bind 127.0.0.1:" .. ports[1],
          "  default_backend api",
          "backend api",
          "  server x 127.0.0.1:" .. f.port,
          "backend empty",
        }, "\n")
      end,
    })
    hp = assert(haproxy.new({ socket = h.socket, backend = "api" }))
  end)

  teardown(function()
    if h then h:stop() end
    if f then f:stop() end
  end)

  it("reads the backend's servers, not the frontend's row", function()
    local all = assert(hp:stats())
    assert.same({ "x" }, (function()
      local names = {}
      for name in pairs(all) do names[#names + 1] = name end
      return names
    end)())
    local st = assert(hp:state("x"))
    assert.equal("ready", st.admin)
    assert.equal(1, st.user_weight)
  end)

  it("a drain waits for the server's session: a slow request through HAProxy ends first", function()
    local url = ("http://127.0.0.1:%d/slow?ms=1500"):format(h.ports[1])
    local sent = rr.now()
    local slow = rr.spawn(function() return http.get(url, { timeout = 30 }) end)
    assert.is_true(eventually(function() return assert(hp:stats()).x.sessions == 1 end),
      "the slow request never reached x")
    assert.is_true(hp:drain("x"))
    local ok, st = hp:wait_drained("x", 20)
    -- x answers 1.5 s after it got the request: its session cannot have ended sooner
    local waited = rr.now() - sent
    assert.is_true(ok)
    assert.equal(0, st.sessions)
    assert.is_true(waited >= 1.45, ("the drain wait ended %.3f s after the request was sent"):format(waited))
    local res = assert(select(2, rr.wait(slow)))
    assert.equal(200, res.status)
    assert.is_true(hp:ready("x"))
  end)

  it("an absent server, and a backend without servers, are ENOENT; an unknown backend ENOBACKEND", function()
    local st, err, code = hp:state("nope")
    assert.is_nil(st)
    assert.equal("HAProxy at " .. h.socket .. ": backend api has no server nope", err)
    assert.equal("ENOENT", code)
    assert.same({ nil, err, "ENOENT" }, { hp:wait_drained("nope", 1) })
    local empty = assert(haproxy.new({ socket = h.socket, backend = "empty" }))
    local ok
    ok, err, code = empty:wait_drained("x", 1)
    assert.is_nil(ok)
    assert.equal("HAProxy at " .. h.socket .. ": backend empty has no servers", err)
    assert.equal("ENOENT", code)
    assert.same({ nil, err, "ENOENT" }, { empty:state("x") })
    local fe_only = assert(haproxy.new({ socket = h.socket, backend = "fe" }))
    ok, err, code = fe_only:wait_drained("other", 1)
    assert.is_nil(ok)
    assert.equal("HAProxy at " .. h.socket .. ": no backend fe", err)
    assert.equal("ENOBACKEND", code)
  end)
end)

describe("rr.balancer", function()
  local f, h, dir

  setup(function()
    f = { hx.fixture(), hx.fixture() }
    h = hx.start({ servers = { { name = "api.1", port = f[1].port }, { name = "api-2", port = f[2].port } } })
    dir = assert(fs.mkdtemp("/tmp/rr-balancer-"))
  end)

  teardown(function()
    if h then h:stop() end
    for _, s in ipairs(f or {}) do s:stop() end
    if dir then fs.remove_tree(dir) end
  end)

  describe("over HAProxy", function()
    local b
    before_each(function()
      b = assert(balancer.open({ balancer = { haproxy = h.socket, backend = "app" } }, dir))
      for _, s in ipairs({ "api.1", "api-2" }) do
        assert(haproxy.new({ socket = h.socket, backend = "app" }):ready(s))
      end
    end)

    it("drains, waits and enables a member by its balancer server name", function()
      assert.equal("haproxy", b.kind)
      assert.equal("HAProxy " .. h.socket .. " backend app", b:describe())
      local m = { name = "sso.api.2", server = "api-2" }
      assert.equal("ready", assert(b:state(m)).admin)
      assert.is_true(b:drain(m))
      assert.equal("drain", assert(b:state(m)).admin)
      assert.is_true(b:wait_drained(m, 5))
      assert.is_true(b:enable(m))
      assert.equal("ready", assert(b:state(m)).admin)
    end)

    it("names a member's server by its service name when it has no balancer_server", function()
      assert.is_true(b:drain({ name = "api.1" }))
      assert.equal("drain", assert(b:state({ name = "api.1", balancer_server = "api.1" })).admin)
    end)

    it("reports a member already in maintenance and never drains it (that would put it back)", function()
      local hp = assert(haproxy.new({ socket = h.socket, backend = "app" }))
      assert(hp:maint("api.1"))
      local m = { name = "sso.api.1", server = "api.1" }
      assert.equal("maint", assert(b:state(m)).admin)
      local ok, err, code, st = b:drain(m)
      assert.is_nil(ok)
      assert.equal("sso.api.1: api.1 is in maintenance on HAProxy " .. h.socket
        .. " backend app (set outside this run): not touching it", err)
      assert.equal("EMAINT", code)
      assert.equal("maint", st.admin)
      assert.equal("maint", assert(hp:state("api.1")).admin)
    end)

    it("enables a canary at its weight, and gives back the weight it had (not the configured one)", function()
      local hp = assert(haproxy.new({ socket = h.socket, backend = "app" }))
      local m = { name = "sso.api.2", server = "api-2" }
      assert(hp:set_weight("api-2", 40))
      assert(b:drain(m))
      assert.is_true(b:enable({ name = "sso.api.2", server = "api-2", weight = 4 }))
      local st = assert(hp:state("api-2"))
      assert.equal("ready", st.admin)
      assert.equal(4, st.user_weight)
      assert.equal(4, st.weight)
      assert.same({ true, 40 }, { b:restore_weight(m) })
      assert.equal(40, assert(hp:state("api-2")).user_weight)
      -- nothing saved any more: nothing to restore
      assert.same({ true }, { b:restore_weight(m) })
      -- HAProxy rounds a percentage of the configured weight (1 here) down: 50% would be no traffic
      local ok, err, code = b:enable({ name = "sso.api.2", server = "api-2", weight = "50%" })
      assert.is_nil(ok)
      assert.equal("50% of api-2's configured weight 1 is 0: it would get no traffic (configure the servers with a "
        .. "larger weight, e.g. `weight 100`, or give a number)", err)
      assert.equal("EINVAL", code)
      assert.equal(40, assert(hp:state("api-2")).user_weight)
      assert.is_true(b:enable({ name = "sso.api.2", server = "api-2", weight = "100%" }))
      assert.equal(1, assert(hp:state("api-2")).user_weight)
      assert.same({ true, 40 }, { b:restore_weight(m) })
      assert.is_true(b:can_weight())
      assert(hp:set_weight("api-2", "100%"))
    end)

    it("a weight HAProxy refuses fails the enable, and the member stays out of rotation", function()
      local hp = assert(haproxy.new({ socket = h.socket, backend = "app" }))
      local m = { name = "api.1", weight = 300 }
      assert(b:drain(m))
      local ok, err, code = b:enable(m)
      assert.is_nil(ok)
      assert.matches("Absolute weight can only be between 0 and 256", err, 1, true)
      assert.equal("EHAPROXY", code)
      assert.equal("drain", assert(hp:state("api.1")).admin)
      assert.equal(1, assert(hp:state("api.1")).user_weight)
    end)

    it("says ENOENT for a member HAProxy does not know", function()
      local _, _, code = b:drain({ name = "api.9" })
      assert.equal("ENOENT", code)
    end)
  end)

  describe("over a Lua script", function()
    -- A balancer that keeps its state in files: down/<server> while drained, sessions/<server>
    -- holds the count sessions() reports.
    local script
    before_each(function()
      fs.remove_tree(dir .. "/lb")
      assert(fs.mkdir_p(dir .. "/lb/down"))
      assert(fs.mkdir_p(dir .. "/lb/sessions"))
      script = helpers.write(dir .. "/lb.lua", ([[
        local fs = require("rr.fs")
        local base = %q
        local function server(m) return m.server or m.name end
        return {
          drain = function(m)
            if server(m) == "refuses" then return false, "the LB said no" end
            if server(m) == "raises" then error("LB unreachable") end
            return fs.write_atomic(base .. "/down/" .. server(m), "down")
          end,
          enable = function(m) return fs.remove(base .. "/down/" .. server(m)) end,
          sessions = function(m)
            return tonumber(fs.read(base .. "/sessions/" .. server(m)) or "0")
          end,
          state = function(m)
            if server(m) == "maint" then return { admin = "maint" } end
            return { admin = fs.exists(base .. "/down/" .. server(m)) and "drain" or "ready" }
          end,
        }
      ]]):format(dir .. "/lb"))
    end)

    it("drains and enables through the script, a path relative to the services file", function()
      local b = assert(balancer.open({ balancer = "lb.lua" }, dir))
      assert.equal("script", b.kind)
      assert.equal("balancer script " .. script, b:describe())
      local m = { name = "web.1" }
      assert.is_true(b:drain(m))
      assert.is_true(fs.exists(dir .. "/lb/down/web.1"))
      assert.equal("drain", assert(b:state(m)).admin)
      assert.is_true(b:enable(m))
      assert.is_false(fs.exists(dir .. "/lb/down/web.1"))
    end)

    it("waits until sessions() reaches 0", function()
      local b = assert(balancer.open({ balancer = script }, dir))
      local m = { name = "web.1" }
      helpers.write(dir .. "/lb/sessions/web.1", "2")
      local waiter = rr.spawn(function() return b:wait_drained(m, 30) end)
      assert.is_true(eventually(function() return waiter:status() == "waiting" end))
      helpers.write(dir .. "/lb/sessions/web.1", "0")
      assert.same({ true, true }, { rr.wait(waiter) })
    end)

    it("times out when sessions() stays above 0", function()
      local b = assert(balancer.open({ balancer = script }, dir))
      helpers.write(dir .. "/lb/sessions/web.1", "3")
      local ok, err, code = b:wait_drained({ name = "web.1" }, 0.2)
      assert.is_nil(ok)
      assert.equal("web.1 still has 3 session(s) after 0.2 s (" .. script .. ")", err)
      assert.equal("ETIMEDOUT", code)
    end)

    it("reports a script's refusal and a script's error as EBALANCER", function()
      local b = assert(balancer.open({ balancer = script }, dir))
      local ok, err, code = b:drain({ name = "x", server = "refuses" })
      assert.is_nil(ok)
      assert.equal(script .. ": drain(refuses) failed: the LB said no", err)
      assert.equal("EBALANCER", code)
      ok, err, code = b:drain({ name = "x", server = "raises" })
      assert.is_nil(ok)
      assert.equal(1, err:find(script .. ": drain(raises) raised: ", 1, true))
      assert.matches("LB unreachable$", err)
      assert.equal("EBALANCER", code)
    end)

    it("sets and gives back a weight through the script's weight(member, w)", function()
      helpers.write(dir .. "/weights.lua", ([[
        local fs = require("rr.fs")
        local path = %q
        return {
          drain = function() return true end,
          enable = function(m) return fs.write_atomic(path .. ".enabled", fs.read(path) or "") end,
          weight = function(m, w)
            local before = fs.read(path) or "100"
            assert(fs.write_atomic(path, tostring(w)))
            return tonumber(before) or before
          end,
        }
      ]]):format(dir .. "/lb/weight"))
      local b = assert(balancer.open({ balancer = "weights.lua" }, dir))
      assert.is_true(b:can_weight())
      assert.is_true(b:enable({ name = "web.1", weight = "10%" }))
      -- the weight was set before the member went back in rotation
      assert.equal("10%", fs.read(dir .. "/lb/weight.enabled"))
      assert.same({ true, 100 }, { b:restore_weight({ name = "web.1" }) })
      assert.equal("100", fs.read(dir .. "/lb/weight"))
      local plain = assert(balancer.open({ balancer = script }, dir))
      assert.is_false(plain:can_weight())
      local ok, err, code = plain:enable({ name = "web.1", weight = 10 })
      assert.is_nil(ok)
      assert.equal(script .. " has no weight(member, w) function", err)
      assert.equal("EBALANCER", code)
      helpers.write(dir .. "/badweight.lua", "return { drain = print, enable = print, weight = 10 }")
      _, err, code = balancer.open({ balancer = "badweight.lua" }, dir)
      assert.equal("balancer script " .. dir .. "/badweight.lua: weight must be a function", err)
      assert.equal("EINVAL", code)
    end)

    it("never drains a member the script reports in maintenance", function()
      local b = assert(balancer.open({ balancer = script }, dir))
      local _, _, code = b:drain({ name = "maint" })
      assert.equal("EMAINT", code)
      assert.is_false(fs.exists(dir .. "/lb/down/maint"))
    end)

    it("waits the whole timeout when the script cannot count sessions", function()
      helpers.write(dir .. "/blind.lua", "return { drain = function() return true end, enable = function() return true end }")
      local b = assert(balancer.open({ balancer = "blind.lua" }, dir))
      assert.same({ admin = "unknown" }, assert(b:state({ name = "a" })))
      local t0 = rr.now()
      assert.is_true(b:wait_drained({ name = "a" }, 0.2))
      assert.is_true(rr.now() - t0 >= 0.2)
    end)

    it("refuses a bad script or configuration with a message and a code", function()
      local _, err, code = balancer.open({ balancer = "missing.lua" }, dir)
      assert.equal("balancer script " .. dir .. "/missing.lua: no such file", err)
      assert.equal("ENOENT", code)
      helpers.write(dir .. "/half.lua", "return { drain = function() return true end }")
      _, err, code = balancer.open({ balancer = "half.lua" }, dir)
      assert.equal("balancer script " .. dir .. "/half.lua has no enable(member) function", err)
      assert.equal("EINVAL", code)
      helpers.write(dir .. "/broken.lua", "return {")
      _, err, code = balancer.open({ balancer = "broken.lua" }, dir)
      assert.matches("^balancer script .*broken.lua: ", err)
      assert.equal("EINVAL", code)
      _, err, code = balancer.open({ balancer = { haproxy = h.socket } }, dir)
      assert.equal("balancer: expected { haproxy = SOCKET, backend = NAME }", err)
      assert.equal("EINVAL", code)
      _, err, code = balancer.open({ balancer = { haproxy = h.socket, backend = "app", drain = 3 } }, dir)
      assert.matches('unknown field "drain"', err)
      assert.equal("EINVAL", code)
      _, _, code = balancer.open({ balancer = 42 }, dir)
      assert.equal("EINVAL", code)
    end)
  end)

  describe("the nginx example (hooks/nginx.lua)", function()
    -- No nginx here: the spec runs the example against a missing nginx binary, so drain() fails
    -- at `nginx -t` and must leave the include file as it was.
    it("loads as a balancer script, and a failed nginx check leaves the include unchanged", function()
      local include = dir .. "/sso_api.upstream"
      helpers.write(include, "# the operator's file\n")
      local res = assert(proc.run({ helpers.engine, "-e", [[
        local b = assert(require("rr.balancer").open({ balancer = "hooks/nginx.lua" }, "."))
        print(assert(b:state({ name = "sso.api.1" })).admin)
        print(b:drain({ name = "sso.api.1" }))
        print(b:drain({ name = "sso.api.9" }))
      ]] }, { cwd = hx.root, env = { RR_NGINX_INCLUDE = include, RR_NGINX_BIN = "/nonexistent/nginx" } }))
      local lines = {}
      for line in res.stdout:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal("ready", lines[1])
      assert.equal("nil\t./hooks/nginx.lua: drain(sso.api.1) failed: nginx: cannot run /nonexistent/nginx: "
        .. "No such file or directory\tEBALANCER", lines[2])
      assert.matches("state%(sso%.api%.9%) failed: no address for server sso%.api%.9 in hooks/nginx%.lua's SETTINGS%.servers\tEBALANCER$",
        lines[3])
      assert.equal("# the operator's file\n", fs.read(include))
    end)
  end)
end)

describe("draining before a kill, under a real wrk load", function()
  -- Three servers; s2 answers in 500 ms, so a request it has is still in flight when it is
  -- killed. HAProxy re-sends a request whose connection fails (retries 3, option redispatch 1),
  -- not one already sent (retry-on keeps its default, conn-failure).
  local function scenario(drain)
    local f = { hx.fixture({ "--delay-ms", "20" }), hx.fixture({ "--delay-ms", "500" }),
                hx.fixture({ "--delay-ms", "20" }) }
    local h = hx.start({
      servers = { { name = "s1", port = f[1].port }, { name = "s2", port = f[2].port },
                  { name = "s3", port = f[3].port } },
      check = true,
      backend_options = { "retries 3", "option redispatch 1" },
    })
    local hp = assert(haproxy.new({ socket = h.socket, backend = "app" }))
    local ok, result = pcall(function()
      local load = hx.wrk(url(h), 2, 4)
      assert.is_true(eventually(function() return assert(hp:stats()).s2.sessions > 0 end),
        "s2 never had a request in flight")
      if drain then
        assert.is_true(hp:drain("s2"))
        assert.is_true(hp:wait_drained("s2", 5))
      end
      f[2]:kill("KILL")
      return load:wait()
    end)
    h:stop()
    for _, s in ipairs(f) do s:stop() end
    assert(ok, result)
    return result
  end

  it("a drained server killed under load fails no request", function()
    local r = scenario(true)
    assert.is_true(r.requests > 0)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
  end)

  it("a server killed under load without a drain fails the requests it had (so the check above can fail)", function()
    local r = scenario(false)
    assert.is_true(r.non2xx + r.socket_errors > 0, r.output)
  end)
end)
