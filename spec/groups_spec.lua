-- Replica groups end to end: three fixture replicas, real units of the sandboxed user manager,
-- behind a real HAProxy (spec/support/haproxy.lua), rolled by plans/rolling.lua as an operator
-- runs it, under a real wrk load through HAProxy.
--   spec/support/run-specs ./rrengine spec/groups_spec.lua
--
-- What is measured, and how:
--   * wrk (8 connections) runs for exactly the roll: started before it, stopped with SIGINT
--     after it (wrk then prints its report); every non-2xx answer and every socket error is a
--     failed request.
--   * the budget is sampled every 20 ms (or as fast as a sample goes) by a task of this process while the engine (another
--     process) rolls: per member, HAProxy's admin state (one `show servers state`: drain or
--     maint, or an operational state of stopped), then the unit's ActiveState and MainPID
--     (rr.systemd), then its /health. A member is down in a sample when any of them says so.
--     Each of these is a subset of what the engine counts as unavailable (drain or stop until
--     post-check and stabilization passed, or unhealthy), in that order, so a sample never counts
--     more than the engine does: a sample over the budget is the engine's fault.
--   * the replicas answer every request 20 ms late (so requests are in flight when a member
--     stops) and listen only 0.5 s after a restart (connections refused meanwhile): a restart
--     without a drain loses the requests the member had in flight (HAProxy retries a refused
--     connection, not a request already sent), which the roll without the balancer shows.
--   * members stabilize 0.5 s: longer than a sample takes, so the one member the engine put
--     back and the next one it drains are never both in one sample.
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local http = require("rr.http")
local haproxy = require("rr.haproxy")
local hx = require("spec.support.haproxy")
local platform = require("spec.support.platform")
local helpers = require("spec.support.helpers")

local MEMBERS = { "g.1", "g.2", "g.3" }
local BACKEND = "grp"

local eventually = helpers.eventually

local function index_of(list, pred, from)
  for i = from or 1, #list do
    if pred(list[i]) then return i end
  end
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local last_run, events_of = helpers.last_run, helpers.events_of

local function output(res)
  return ("exit %s\nstdout:\n%s\nstderr:\n%s"):format(tostring(res.exit_code), res.stdout or "", res.stderr or "")
end

-- wrk through HAProxy for as long as the roll takes. Returns load.stop() -> the report's counts.
local function load_on(h, hp)
  return hx.load(hp, ("http://127.0.0.1:%d/health"):format(h.port))
end

-- Samples the group every ~20 ms until w:stop(). hp nil: units and health only.
--   w.max          the most members down in one sample; w.worst describes that sample
--   w.seen[n]      the MainPIDs member n had, in order
--   w.drained[n]   HAProxy showed member n drained at some sample
--   w.ready_unhealthy[n]  samples where HAProxy had member n in rotation while its /health did
--                  not answer 200, once an earlier sample saw it drained or restarted (before
--                  that a release may have broken the old process: not the engine's doing). HAProxy
--                  is read first: in rotation at that moment means put back before it, so after a
--                  passed check, and a failed probe after it is a member in rotation unhealthy.
local function watch(p, hp)
  local w = { max = 0, worst = "no sample", samples = 0, seen = {}, drained = {}, ready_unhealthy = {} }
  local units = {}
  for _, n in ipairs(MEMBERS) do
    units[n] = p:unit(n)
    w.seen[n] = {}
    w.ready_unhealthy[n] = {}
  end
  local function one()
    local touched = {}
    for _, n in ipairs(MEMBERS) do touched[n] = w.drained[n] or #w.seen[n] > 1 end
    local why = {}
    local function down(n, reason)
      why[n] = why[n] and (why[n] .. ", " .. reason) or reason
    end
    local admin = {}
    if hp then
      local servers = assert(hp:servers())
      for _, n in ipairs(MEMBERS) do
        local s = assert(servers[n], "HAProxy has no server " .. n)
        admin[n] = s.admin
        if s.admin ~= "ready" then
          down(n, "haproxy " .. s.admin)
          if s.admin == "drain" then w.drained[n] = true end
        elseif s.operational == "stopped" then
          down(n, "haproxy stopped")
        end
      end
    end
    for _, n in ipairs(MEMBERS) do
      local state = assert(units[n]:get("ActiveState"))
      local pid = assert(units[n]:get("MainPID"))
      if state ~= "active" then down(n, "unit " .. state) end
      local seen = w.seen[n]
      if pid ~= 0 and seen[#seen] ~= pid then seen[#seen + 1] = pid end
    end
    local probes = {}
    for i, n in ipairs(MEMBERS) do
      probes[i] = rr.spawn(function()
        local res, err = http.get(p.by_name[n].url, { timeout = 1 })
        return res and res.status or err
      end)
    end
    for i, r in ipairs(rr.wait(probes)) do
      local n = MEMBERS[i]
      assert(r[1], r[2])
      if r[2] ~= 200 then
        down(n, "health " .. tostring(r[2]))
        if admin[n] == "ready" and touched[n] then
          local list = w.ready_unhealthy[n]
          list[#list + 1] = tostring(r[2])
        end
      end
    end
    local count, parts = 0, {}
    for _, n in ipairs(MEMBERS) do
      if why[n] then
        count = count + 1
        parts[#parts + 1] = n .. ": " .. why[n]
      end
    end
    if count > w.max then
      w.max = count
      w.worst = ("%d down: %s"):format(count, table.concat(parts, "; "))
    end
  end
  return hx.sample(w, one)
end

describe("replica groups behind a real HAProxy, under a real wrk load", function()
  local p, h, hp

  setup(function()
    local defs = {}
    for i, n in ipairs(MEMBERS) do
      defs[i] = { name = n, http = true, code = true, reload = false, group = "g", stabilize = 0.5,
                  fixture = { delay_ms = 20, listen_delay = 0.5 } }
    end
    p = platform.new(defs, { groups = { g = { max_unavailable = 1 } } })
    p:start()
    local servers = {}
    for i, n in ipairs(MEMBERS) do servers[i] = { name = n, port = p.by_name[n].port } end
    -- No HAProxy health checks: what takes a member out of rotation is the engine's drain only,
    -- and a restarting member without a drain is sent requests it cannot answer.
    h = hx.start({ servers = servers, backend = BACKEND })
    hp = assert(haproxy.new({ socket = h.socket, backend = BACKEND }))
  end)

  teardown(function()
    if h then h:stop() end
    if p then p:teardown() end
  end)

  -- Every member healthy, running and in rotation, whatever the spec before left.
  before_each(function()
    for _, n in ipairs(MEMBERS) do
      p:control(n, nil)
      local u = p:unit(n)
      if u:get("ActiveState") ~= "active" then
        u:reset_failed()
        assert(u:start("replace"))
      end
      local ok, why = require("rr.health").check(u, { kind = "http", url = p.by_name[n].url, timeout = 10, retries = 3,
        interval = 0.2 })
      assert(ok, ("%s is not healthy: %s"):format(n, tostring(why)))
      assert(hp:ready(n))
    end
  end)

  -- The services file with this group (g) and, optionally, other service entries.
  local function services_with(group, name, services)
    return p:write_services({ groups = { g = group }, services = services }, p.dir .. "/" .. name .. ".lua")
  end

  local function with_haproxy(extra)
    local g = { max_unavailable = 1, drain_timeout = 5, balancer = { haproxy = h.socket, backend = BACKEND } }
    for k, v in pairs(extra or {}) do g[k] = v end
    return g
  end

  it("rolls the whole group with --parallel 0: no failed request, one member down at a time, each restarted", function()
    local file = services_with(with_haproxy(), "haproxy")
    local before = p:pids()
    local load = load_on(h, hp)
    local w = watch(p, hp)
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.is_true(w.max <= 1, w.worst)
    assert.equal(1, w.max, "the sampler never saw a member down (" .. w.samples .. " samples)")
    local after = p:pids()
    local evs = last_run(p)
    for _, n in ipairs(MEMBERS) do
      assert.are_not.equal(before[n], after[n], n .. " was not restarted")
      assert.is_true(w.drained[n], n .. " was never seen drained")
      assert.same({}, w.ready_unhealthy[n], n .. " was in rotation while unhealthy")
      assert.equal(1, #events_of(evs, "BALANCER_DRAIN", n), n)
      local drain = events_of(evs, "BALANCER_DRAIN", n)[1]
      assert.equal(n, drain.server)
      assert.is_number(drain.duration_ms)
      assert.equal(1, #events_of(evs, "BALANCER_ENABLE", n), n)
      assert.equal("ready", assert(hp:state(n)).admin)
    end
  end)

  it("the same roll without the balancer fails requests (so the check above can fail)", function()
    local file = services_with({ max_unavailable = 1 }, "nobalancer")
    local before = p:pids()
    local load = load_on(h, hp)
    local w = watch(p, nil)
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.non2xx + r.socket_errors > 0, "no request failed without a drain:\n" .. r.output)
    -- the failures come from the missing drain, not from too many members down
    assert.is_true(w.max <= 1, w.worst)
    assert.same({}, events_of(last_run(p), "BALANCER_DRAIN"))
    local after = p:pids()
    for _, n in ipairs(MEMBERS) do assert.are_not.equal(before[n], after[n], n .. " was not restarted") end
  end)

  it("a budget of \"67%\" of 3 takes two members down at once, never three, and fails no request", function()
    local file = services_with(with_haproxy({ max_unavailable = "67%" }), "percent")
    local before = p:pids()
    local load = load_on(h, hp)
    local w = watch(p, hp)
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(w.max <= 2, w.worst)
    assert.equal(2, w.max, "two members were never down at once: " .. w.worst)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    local after = p:pids()
    for _, n in ipairs(MEMBERS) do
      assert.are_not.equal(before[n], after[n], n .. " was not restarted")
      assert.same({}, w.ready_unhealthy[n], n .. " was in rotation while unhealthy")
    end
  end)

  it("a member already unhealthy uses the budget of 1: no other member is drained, its pre-check fails the run", function()
    local file = services_with(with_haproxy(), "unhealthy")
    p:control("g.2", { status = 500 })
    local before = p:pids()
    local w = watch(p, hp)
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    w.stop()
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    assert.same({}, events_of(evs, "BALANCER_DRAIN"))
    local pre = events_of(evs, "HEALTH_CHECK_FAILED", "g.2")
    assert.equal(1, #pre, output(res))
    assert.equal("pre", pre[1].phase)
    for _, n in ipairs({ "g.1", "g.3" }) do
      assert.same({}, events_of(evs, "SERVICE_RESTART_START", n), n .. " was started while g.2 used the budget")
    end
    assert.same(before, p:pids())
    assert.is_true(w.max <= 1, w.worst)
    for _, n in ipairs(MEMBERS) do
      assert.is_nil(w.drained[n], n .. " was drained")
      assert.equal("ready", assert(hp:state(n)).admin)
    end
  end)

  it("a member whose new version is unhealthy is rolled back and back in rotation only once healthy", function()
    local release = p.dir .. "/release"
    helpers.write(release .. "/version", "v2\n")
    -- the release is broken: its control file makes /health answer 500
    helpers.write(release .. "/g.2.control", "status=500\n")
    local file = services_with(with_haproxy(), "deploy")
    local before = p:pids()
    local w = watch(p, hp)
    local res = p:cli({ "--service", "g.2", "--deploy", "--deploy-path", release }, { services_file = file })
    w.stop()
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    local function at(name, phase)
      return index_of(evs, function(ev)
        return ev.event == name and ev.service == "g.2" and (phase == nil or ev.phase == phase)
      end)
    end
    local drain, failed, rollback = at("BALANCER_DRAIN"), at("HEALTH_CHECK_FAILED", "post"), at("ROLLBACK_START")
    local healthy, enable = at("HEALTH_CHECK_PASSED", "rollback"), at("BALANCER_ENABLE")
    assert.is_truthy(drain, output(res))
    assert.is_truthy(failed, output(res))
    assert.is_truthy(healthy, output(res))
    assert.is_truthy(enable, output(res))
    assert.is_true(drain < failed and failed < rollback and rollback < healthy and healthy < enable)
    assert.equal(1, #events_of(evs, "BALANCER_ENABLE", "g.2"), "g.2 was put back in rotation more than once")
    assert.is_true(w.drained["g.2"])
    assert.same({}, w.ready_unhealthy["g.2"], "g.2 was in rotation while unhealthy")
    assert.equal("ready", assert(hp:state("g.2")).admin)
    local body = assert(http.get(p.by_name["g.2"].url)).body
    assert.matches("version=v1", body)
    assert.are_not.equal(before["g.2"], p:pids()["g.2"])
    assert.equal(before["g.1"], p:pids()["g.1"])
  end)

  it("a member that stays unhealthy after its rollback stays drained, and the run says so", function()
    -- The migration breaks the member for good: migrations are not undone by a rollback.
    local services = copy(p.services)
    services[3] = copy(services[3])
    services[3].migrate = { "/bin/sh", "-c", "printf 'status=500\\n' > g.3.control" }
    local file = services_with(with_haproxy(), "broken", services)
    local w = watch(p, hp)
    local res = p:cli({ "--service", "g.3" }, { services_file = file })
    w.stop()
    assert.equal(3, res.exit_code, output(res))
    local evs = last_run(p)
    assert.equal(1, #events_of(evs, "BALANCER_DRAIN", "g.3"))
    assert.same({}, events_of(evs, "BALANCER_ENABLE", "g.3"))
    assert.equal("drain", assert(hp:state("g.3")).admin)
    assert.same({}, w.ready_unhealthy["g.3"], "g.3 was in rotation while unhealthy")
    local said = false
    for _, ev in ipairs(events_of(evs, "WARNING")) do
      if ev.warning:find("g.3", 1, true) and ev.warning:find("out of rotation", 1, true) then said = true end
    end
    assert.is_true(said, "no WARNING says g.3 stays out of rotation")
    assert.matches("g%.3 stays out of rotation", res.stdout .. res.stderr)
  end)

  it("leaves a member in maintenance alone: its flow fails untouched, naming maint", function()
    local file = services_with(with_haproxy(), "maint")
    assert(hp:maint("g.1"))
    local before = p:pids()
    local res = p:cli({ "--service", "g.1" }, { services_file = file })
    assert.equal(1, res.exit_code, output(res))
    assert.matches("maint", res.stdout .. res.stderr)
    assert.equal("maint", assert(hp:state("g.1")).admin)
    assert.same(before, p:pids())
    assert.same({}, events_of(last_run(p), "BALANCER_DRAIN"))
  end)

  it("an HAProxy that cannot be reached before the run: exit 1, one message naming the socket, nothing touched", function()
    local missing = h.dir .. "/missing.sock"
    local file = services_with({ max_unavailable = 1, balancer = { haproxy = missing, backend = BACKEND } }, "missing")
    local before = p:pids()
    local log_before = fs.read(p.events_file)
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    assert.equal(1, res.exit_code, output(res))
    local lines = {}
    for line in (res.stdout .. res.stderr):gmatch("[^\n]+") do
      if line:find(missing, 1, true) then lines[#lines + 1] = line end
    end
    assert.equal(1, #lines, output(res))
    assert.matches("HAProxy", lines[1])
    assert.same(before, p:pids())
    assert.equal(log_before, fs.read(p.events_file), "the run logged events: it started")
    for _, n in ipairs(MEMBERS) do assert.equal("ready", assert(hp:state(n)).admin) end
  end)

  it("calls a Lua balancer in order: drain before the restart job, enable after the post-check", function()
    local calls = p.dir .. "/lb.calls"
    os.remove(calls)
    local units_of, urls = {}, {}
    for _, n in ipairs(MEMBERS) do
      units_of[n] = p.by_name[n].unit
      urls[n] = p.by_name[n].url
    end
    -- The script runs inside the engine: it notes each call with the member's MainPID at that
    -- moment (and, when it enables, the member's health as the balancer would see it).
    helpers.write(p.dir .. "/lb.lua", ([[
      local fs = require("rr.fs")
      local http = require("rr.http")
      local systemd = require("rr.systemd")
      local calls, units, urls = %q, %s, %s
      local m
      local function pid(name)
        m = m or assert(systemd.user())
        return assert(m:unit(units[name]):get("MainPID"))
      end
      local function note(line)
        assert(fs.write_atomic(calls, (fs.read(calls) or "") .. line .. "\n"))
      end
      return {
        drain = function(member)
          note(("drain %%s %%s %%d"):format(member.name, member.server, pid(member.name)))
          return true
        end,
        enable = function(member)
          local res = http.get(urls[member.name], { timeout = 2 })
          note(("enable %%s %%s %%d %%s"):format(member.name, member.server, pid(member.name), res and res.status or "none"))
          return true
        end,
        sessions = function() return 0 end,
      }
    ]]):format(calls, platform.serialize(units_of), platform.serialize(urls)))
    local services = copy(p.services)
    services[3] = copy(services[3])
    services[3].balancer_server = "third"
    -- relative: resolved against the services file's directory
    local file = services_with({ max_unavailable = 1, drain_timeout = 5, balancer = "lb.lua" }, "script", services)
    local before = p:pids()
    local res = p:cli({ "--parallel", "0" }, { services_file = file })
    assert.equal(0, res.exit_code, output(res))
    local after = p:pids()
    local lines = {}
    for line in assert(fs.read(calls)):gmatch("[^\n]+") do lines[#lines + 1] = line end
    local expected = {}
    for _, n in ipairs(MEMBERS) do
      local server = n == "g.3" and "third" or n
      expected[#expected + 1] = ("drain %s %s %d"):format(n, server, before[n])
      expected[#expected + 1] = ("enable %s %s %d 200"):format(n, server, after[n])
    end
    assert.same(expected, lines)
    local evs = last_run(p)
    for _, n in ipairs(MEMBERS) do
      assert.are_not.equal(before[n], after[n])
      local function at(name, phase)
        return index_of(evs, function(ev)
          return ev.event == name and ev.service == n and (phase == nil or ev.phase == phase)
        end)
      end
      local drain, restart, post = at("BALANCER_DRAIN"), at("UNIT_RESTART"), at("HEALTH_CHECK_PASSED", "post")
      local enable, done = at("BALANCER_ENABLE"), at("SERVICE_RESTART_SUCCESS")
      assert.is_truthy(drain and restart and post and enable and done, n)
      assert.is_true(drain < restart and restart < post and post < enable and enable < done, n)
    end
  end)
end)
