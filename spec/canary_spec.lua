-- Canary releases end to end: three fixture replicas (real units of the sandboxed user manager,
-- each with its code in a working_dir) behind a real HAProxy, a release deployed to the group
-- by plans/rolling.lua as an operator runs it, under a real wrk load through HAProxy.
--   spec/support/run-specs ./rrengine spec/canary_spec.lua
--
-- The load asks GET /app (the replicas' "application": /health stays the engine's probe). A
-- release whose control file says error_share=20 answers 500 on every fifth /app; each replica
-- counts its answers on /metrics (Prometheus text), which hooks/canary.lua, the example
-- analysis shipped in the repository, reads. What the clients got from each replica is read from
-- HAProxy's own per-server counters (show stat), not from the replicas.
--
-- The other members are watched by a task of this process every ~20 ms (HAProxy's admin state of
-- every server) while the engine, another process, rolls: a member the engine must not touch
-- is never seen drained, and its MainPID is the same after the run.
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local http = require("rr.http")
local cjson = require("cjson")
local haproxy = require("rr.haproxy")
local hx = require("spec.support.haproxy")
local platform = require("spec.support.platform")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")

local MEMBERS = { "c.1", "c.2", "c.3" }
local OTHERS = { "c.2", "c.3" }
local BACKEND = "cny"
-- the example analysis, as shipped
local ANALYSIS = units.root .. "/hooks/canary.lua"

local eventually = helpers.eventually

local function index_of(list, pred, from)
  for i = from or 1, #list do
    if pred(list[i]) then return i end
  end
end

local last_run, events_of = helpers.last_run, helpers.events_of

local function at(evs, name, service)
  return index_of(evs, function(ev) return ev.event == name and (service == nil or ev.service == service) end)
end

local function output(res)
  return ("exit %s\nstdout:\n%s\nstderr:\n%s"):format(tostring(res.exit_code), res.stdout or "", res.stderr or "")
end

describe("a replica group's canary, behind a real HAProxy, under a real wrk load", function()
  local p, h, hp
  local releases = 0

  setup(function()
    local defs = {}
    for i, n in ipairs(MEMBERS) do
      -- requests take 20 ms: some are in flight whenever a member is drained or stopped
      defs[i] = { name = n, http = true, code = true, reload = false, group = "c", stabilize = 0.3,
                  fixture = { delay_ms = 20 } }
    end
    p = platform.new(defs, { groups = { c = { max_unavailable = 1 } } })
    p:start()
    local servers = {}
    -- weight 100: room for a canary's "N%" of it
    for i, n in ipairs(MEMBERS) do servers[i] = { name = n, port = p.by_name[n].port, weight = 100 } end
    h = hx.start({ servers = servers, backend = BACKEND })
    hp = assert(haproxy.new({ socket = h.socket, backend = BACKEND }))
  end)

  teardown(function()
    if h then h:stop() end
    if p then p:teardown() end
  end)

  -- Every member running, healthy and in rotation; no canary held.
  before_each(function()
    for _, n in ipairs(MEMBERS) do
      local u = p:unit(n)
      if u:get("ActiveState") ~= "active" then
        p:control(n, nil)
        u:reset_failed()
        assert(u:start("replace"))
      end
      local ok, why = require("rr.health").check(u, { kind = "http", url = p.by_name[n].url, timeout = 10, retries = 3,
        interval = 0.2 })
      assert(ok, ("%s is not healthy: %s"):format(n, tostring(why)))
      assert(hp:ready(n))
      assert(hp:set_weight(n, "100%"))
    end
    assert.is_nil(fs.read(p.state_root .. "/canary/c.json"), "a canary record is left from before")
  end)

  -- The services file: group c behind HAProxy with this canary, and optionally other services.
  local function services_with(canary, name, services)
    local group = { max_unavailable = 1, drain_timeout = 5, canary = canary,
                    balancer = { haproxy = h.socket, backend = BACKEND } }
    return p:write_services({ groups = { c = group }, services = services }, p.dir .. "/" .. name .. ".lua")
  end

  -- A release directory: `version` says its name (unique per call), plus the given files.
  local function release(name, files)
    releases = releases + 1
    local version = ("%s-%d"):format(name, releases)
    local dir = ("%s/releases/%s"):format(p.dir, version)
    helpers.write(dir .. "/version", version .. "\n")
    for rel, text in pairs(files or {}) do helpers.write(dir .. "/" .. rel, text) end
    return dir, version
  end

  local function deploy_args(dir, extra)
    local args = { "--service", table.concat(MEMBERS, ","), "--deploy", "--deploy-path", dir }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    return args
  end

  -- What each member runs (its /health says the version its process read at start) and has on disk.
  local function running(n)
    local res = assert(http.get(p.by_name[n].url, { timeout = 2 }))
    return res.body:match("version=(%S+)")
  end
  local function on_disk(n)
    return (assert(fs.read(p.by_name[n].working_dir .. "/version")):gsub("\n$", ""))
  end

  -- wrk through HAProxy on /app for as long as the roll takes. Returns load.stop() -> counts.
  local function load_on()
    return hx.load(hp, ("http://127.0.0.1:%d/app"):format(h.port))
  end

  -- HAProxy's admin state of every member every ~20 ms until w.stop():
  --   w.drained[n]  member n was seen out of rotation (drain or maint) at some sample
  --   w.max         the most members out of rotation in one sample
  local function watch()
    local w = { drained = {}, max = 0 }
    return hx.sample(w, function()
      local servers = assert(hp:servers())
      local out = 0
      for _, n in ipairs(MEMBERS) do
        local s = assert(servers[n], "HAProxy has no server " .. n)
        if s.admin ~= "ready" then
          w.drained[n] = true
          out = out + 1
        end
      end
      w.max = math.max(w.max, out)
    end)
  end

  -- Per server, what HAProxy counted between two server_counts.
  local function delta(a, b)
    local out = {}
    for n, s in pairs(b) do
      local was = a[n] or { total = 0, ["2xx"] = 0, ["5xx"] = 0 }
      out[n] = { total = s.total - was.total, ["5xx"] = s["5xx"] - was["5xx"] }
    end
    return out
  end

  -- The other members were never touched: same process, never out of rotation, no flow of theirs.
  local function untouched(evs, before, w, why)
    local pids = p:pids()
    for _, n in ipairs(OTHERS) do
      assert.equal(before[n], pids[n], n .. " was restarted")
      assert.is_nil(w.drained[n], n .. " was seen out of rotation")
      assert.is_nil(at(evs, "SERVICE_RESTART_START", n), n .. " was started")
      assert.is_nil(at(evs, "BALANCER_DRAIN", n), n .. " was drained")
      assert.is_nil(at(evs, "DEPLOY_START", n), n .. " was deployed to")
      local skipped = events_of(evs, "SERVICE_SKIPPED", n)
      assert.equal(1, #skipped, n)
      assert.equal(why, skipped[1].reason)
      assert.equal("ready", assert(hp:state(n)).admin)
    end
  end

  it("a canary whose error rate the analysis finds too high is rolled back; the others are never touched", function()
    -- the new release answers 500 on every fifth /app
    local files = {}
    for _, n in ipairs(MEMBERS) do files[n .. ".control"] = "error_share=20\n" end
    local dir, version = release("bad", files)
    local file = services_with({ count = 1, soak = 6, analysis = ANALYSIS }, "fail")
    local before, old = p:pids(), running("c.1")
    local counts = hx.server_counts(hp)
    local load = load_on()
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    local r = load.stop()
    local served = delta(counts, hx.server_counts(hp))
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)

    local start = events_of(evs, "CANARY_START")
    assert.equal(1, #start, output(res))
    assert.equal("c", start[1].group)
    assert.same({ "c.1" }, start[1].canaries)
    assert.equal(6, start[1].soak)
    local failed = events_of(evs, "CANARY_FAILED")
    assert.equal(1, #failed, output(res))
    assert.equal("c", failed[1].group)
    -- hooks/canary.lua's reason, with its numbers
    assert.matches("^analysis: error rate %d+%.%d%% on the canaries %(%d+ of %d+ answers 5xx%) against 0%.0%% "
      .. "on the other members", failed[1].error)
    assert.matches("error rate %d+%.%d%% on the canaries", res.stdout .. res.stderr)
    assert.is_nil(at(evs, "CANARY_PASSED"))

    -- the canary: rolled back to the old release, code and process
    local rb, ok = at(evs, "ROLLBACK_START", "c.1"), at(evs, "ROLLBACK_SUCCESS", "c.1")
    assert.is_truthy(rb, output(res))
    assert.is_truthy(ok, output(res))
    assert.is_true(at(evs, "CANARY_FAILED") < rb and rb < ok)
    -- it serves: it leaves the rotation before its rollback restarts it, and comes back healthy
    local function after_failure(name)
      return index_of(evs, function(ev) return ev.event == name and ev.service == "c.1" end, at(evs, "CANARY_FAILED"))
    end
    local drain, enable = after_failure("BALANCER_DRAIN"), after_failure("BALANCER_ENABLE")
    assert.is_truthy(drain, "the failed canary was rolled back in rotation (no BALANCER_DRAIN after CANARY_FAILED)")
    assert.is_truthy(enable, "the rolled-back canary was not put back in rotation")
    assert.is_true(drain < enable)
    assert.equal(old, on_disk("c.1"))
    assert.equal(old, running("c.1"))
    assert.are_not.equal(version, running("c.1"))
    assert.is_false(fs.exists(p.by_name["c.1"].control), "the release's control file is still there")
    assert.are_not.equal(before["c.1"], p:pids()["c.1"])
    assert.equal("ready", assert(hp:state("c.1")).admin)

    -- the others waited for the canary, then were skipped for it, never touched
    for _, n in ipairs(OTHERS) do
      local waits = events_of(evs, "SERVICE_WAITING", n)
      assert.is_true(#waits >= 1, n .. " never waited")
      assert.equal("waits for the canary of group c", waits[1].reason)
      assert.are_not.equal(version, on_disk(n))
    end
    untouched(evs, before, w, "the canary of group c failed: " .. failed[1].error)
    assert.is_true(w.max <= 1, "more than one member out of rotation at once")

    -- the clients saw failures from the canary's answers only
    assert.is_true(r.requests > 100, r.output)
    assert.is_true(r.non2xx > 0, "no request failed: the release was not broken?\n" .. r.output)
    assert.is_true(r.non2xx <= served["c.1"].total, ("%d failed requests, c.1 served %d"):format(r.non2xx,
      served["c.1"].total))
    assert.equal(r.non2xx, served["c.1"]["5xx"], r.output)
    for _, n in ipairs(OTHERS) do assert.equal(0, served[n]["5xx"], n) end
    -- and only the release's 500s: the canary left the rotation before its rollback's restart
    assert.equal(0, r.socket_errors, r.output)
  end)

  it("a passing canary promotes: the rest roll after CANARY_PASSED, all on the new release, no failed request", function()
    local dir, version = release("good")
    local file = services_with({ count = 1, soak = 3, analysis = ANALYSIS }, "pass")
    local before = p:pids()
    local load = load_on()
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.is_true(w.max <= 1, "more than one member out of rotation at once")
    local evs = last_run(p)
    local started, passed = at(evs, "CANARY_START"), at(evs, "CANARY_PASSED")
    assert.is_truthy(started, output(res))
    assert.is_truthy(passed, output(res))
    assert.equal("c", evs[passed].group)
    assert.is_number(evs[passed].duration_ms)
    assert.is_nil(at(evs, "CANARY_FAILED"))
    assert.is_true(at(evs, "SERVICE_RESTART_SUCCESS", "c.1") < started)
    for _, n in ipairs(OTHERS) do
      local wait, go = at(evs, "SERVICE_WAITING", n), at(evs, "SERVICE_RESTART_START", n)
      assert.is_truthy(wait, n)
      assert.equal("waits for the canary of group c", evs[wait].reason)
      assert.is_truthy(go, n)
      assert.is_true(wait < passed, n .. " did not wait for the canary")
      assert.is_true(passed < go, n .. " started before the canary passed")
    end
    local after = p:pids()
    for _, n in ipairs(MEMBERS) do
      assert.are_not.equal(before[n], after[n], n .. " was not restarted")
      assert.equal(version, on_disk(n))
      assert.equal(version, running(n))
      assert.is_true(w.drained[n], n .. " was never seen drained")
      assert.equal("ready", assert(hp:state(n)).admin)
    end
  end)

  it("--canary-only holds the group after its canary; --promote rolls the rest with the same release", function()
    local dir, version = release("held")
    local file = services_with({ count = 1, soak = 1 }, "held")
    local before = p:pids()
    local old = running("c.2")
    local w = watch()
    local res = p:cli(deploy_args(dir, { "--canary-only" }), { services_file = file })
    w.stop()
    assert.equal(0, res.exit_code, output(res))
    local evs = last_run(p)
    assert.is_truthy(at(evs, "CANARY_PASSED"), output(res))
    assert.equal(version, running("c.1"))
    assert.equal(version, on_disk("c.1"))
    for _, n in ipairs(OTHERS) do
      assert.equal(old, running(n))
      assert.equal(old, on_disk(n))
    end
    untouched(evs, before, w, "--canary-only: promote with --promote")
    local held = cjson.decode((assert(fs.read(p.state_root .. "/canary/c.json"))))
    assert.equal(evs[1].run, held.run)
    assert.equal(dir, held.release)
    assert.same({ "c.1" }, held.canaries)
    assert.is_string(held.passed_at)

    -- status and the dry run say the group is on two releases on purpose, and how to go on
    local st = assert(proc.run({ helpers.engine, "plans/status.lua", "--user", "--services", file },
      { env = { XDG_STATE_HOME = p.xdg_state }, timeout = 30 }))
    assert.matches("group c: canary held since " .. held.passed_at:gsub("%p", "%%%0") .. ": c%.1 on the new release",
      st.stdout)
    assert.matches("%-%-promote", st.stdout)
    assert.matches("or roll the canaries back with rrengine plans/rollback%.lua %-%-group c %-%-services ", st.stdout)
    local dry = p:cli({ "--dry-run" }, { services_file = file })
    assert.equal(0, dry.exit_code, output(dry))
    assert.matches("canary held: c%.1 passed at [^\n]*1 of 3 members on the new release; promote: [^\n]*%-%-promote",
      dry.stdout)
    local held_pid = p:pids()["c.1"]

    -- promote: the recorded release goes to the rest; the canary is not touched again
    w = watch()
    local pr = p:cli({ "--promote" }, { services_file = file })
    w.stop()
    assert.equal(0, pr.exit_code, output(pr))
    evs = last_run(p)
    assert.is_nil(at(evs, "SERVICE_RESTART_START", "c.1"), "the canary was rolled again")
    assert.is_nil(w.drained["c.1"], "the canary was drained again")
    assert.equal(held_pid, p:pids()["c.1"])
    for _, n in ipairs(MEMBERS) do
      assert.equal(version, running(n))
      assert.equal(version, on_disk(n))
    end
    for _, n in ipairs(OTHERS) do
      assert.is_truthy(at(evs, "SERVICE_RESTART_SUCCESS", n), output(pr))
      assert.are_not.equal(before[n], p:pids()[n])
    end
    assert.is_false(fs.exists(p.state_root .. "/canary/c.json"), "the record outlived the promotion")
  end)

  it("a canary with a weight serves its share of the traffic during the soak, and has its weight back after", function()
    -- weights the operator gave at run time (the configured one is 100): what the canary gets back
    for _, n in ipairs(MEMBERS) do assert(hp:set_weight(n, 50)) end
    local dir, version = release("weighted")
    local file = services_with({ count = 1, soak = 4, weight = 5 }, "weighted")
    local load = load_on()
    local soak = {}
    local res = p:cli(deploy_args(dir), { services_file = file, on_line = function(_, line)
      if line:find("canary of c: c.1 on the new release, soaking", 1, true) then
        local st = assert(hp:state("c.1"))
        soak.weight, soak.user_weight, soak.admin = st.weight, st.user_weight, st.admin
        soak.others = { assert(hp:state("c.2")).user_weight, assert(hp:state("c.3")).user_weight }
        soak.from = hx.server_counts(hp)
      elseif line:find("canary of c passed", 1, true) then
        soak.to = hx.server_counts(hp)
      end
    end })
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    -- during the soak: the set weight, read back over the admin socket
    assert.truthy(soak.from and soak.to, output(res))
    assert.equal("ready", soak.admin)
    assert.equal(5, soak.user_weight)
    assert.equal(5, soak.weight)
    assert.same({ 50, 50 }, soak.others)
    -- its share of the requests: about 5/105, far under the third it would get at equal weights
    local served = delta(soak.from, soak.to)
    local total = served["c.1"].total + served["c.2"].total + served["c.3"].total
    local share = served["c.1"].total / total
    local shares = ("c.1 served %d of %d requests during the soak (%.1f%%)"):format(served["c.1"].total, total,
      share * 100)
    assert.is_true(total > 100, shares)
    assert.is_true(served["c.1"].total > 0, "the canary got no traffic: " .. shares)
    assert.is_true(share < 0.12, shares)
    -- after: the weight it had, before the rest rolled; every member on the new release
    local evs = last_run(p)
    local enable = index_of(evs, function(ev) return ev.event == "BALANCER_ENABLE" and ev.service == "c.1" end)
    assert.equal(5, evs[enable].weight)
    local passed, back = at(evs, "CANARY_PASSED"), at(evs, "BALANCER_WEIGHT", "c.1")
    assert.is_truthy(back, output(res))
    assert.equal(50, evs[back].weight)
    assert.equal("the canary passed", evs[back].reason)
    assert.is_true(passed < back)
    for _, n in ipairs(OTHERS) do
      assert.is_true(back < at(evs, "SERVICE_RESTART_START", n), n .. " rolled before the canary had its weight back")
      assert.is_nil(evs[at(evs, "BALANCER_ENABLE", n)].weight, n .. " was enabled at a canary weight")
    end
    for _, n in ipairs(MEMBERS) do
      local st = assert(hp:state(n))
      assert.equal(50, st.user_weight, n)
      assert.equal("ready", st.admin, n)
      assert.equal(version, running(n))
    end
  end)

  it("a weighted canary that fails is rolled back and back in rotation at the weight it had", function()
    helpers.write(p.dir .. "/no-analysis.lua", [[return function() return false, "not today" end]])
    local dir = release("weighted-bad")
    local file = services_with({ count = 1, soak = 1, weight = "5%", analysis = "no-analysis.lua" }, "weighted-bad")
    local before, old = p:pids(), running("c.1")
    local w = watch()
    local during
    local res = p:cli(deploy_args(dir), { services_file = file, on_line = function(_, line)
      if line:find("canary of c: c.1 on the new release, soaking", 1, true) then
        during = assert(hp:state("c.1")).user_weight
      end
    end })
    w.stop()
    assert.equal(1, res.exit_code, output(res))
    assert.equal(5, during) -- 5% of the configured 100
    local evs = last_run(p)
    assert.equal("analysis: not today", events_of(evs, "CANARY_FAILED")[1].error)
    local rolled, back = at(evs, "ROLLBACK_SUCCESS", "c.1"), at(evs, "BALANCER_WEIGHT", "c.1")
    assert.is_truthy(rolled, output(res))
    assert.is_truthy(back, output(res))
    assert.equal(100, evs[back].weight)
    assert.equal("the canary was rolled back", evs[back].reason)
    -- the rollback put it back in rotation without the canary weight
    local enables = events_of(evs, "BALANCER_ENABLE", "c.1")
    assert.equal(2, #enables)
    assert.equal("5%", enables[1].weight)
    assert.is_nil(enables[2].weight)
    local st = assert(hp:state("c.1"))
    assert.equal(100, st.user_weight)
    assert.equal("ready", st.admin)
    assert.equal(old, running("c.1"))
    untouched(evs, before, w, "the canary of group c failed: analysis: not today")
    for _, n in ipairs(OTHERS) do assert.equal(100, assert(hp:state(n)).user_weight, n) end
  end)

  it("a canary's weight outlives a killed engine: SIGKILL in a weighted soak, --recover gives it back", function()
    -- weights the operator gave at run time: what the canary must get back
    for _, n in ipairs(MEMBERS) do assert(hp:set_weight(n, 50)) end
    local dir = release("weighted-killed")
    local file = services_with({ count = 1, soak = 60, weight = 5 }, "weighted-killed")
    local journal_path = require("rr.state").journal_path(p.state_root)
    local function killed_in_soak()
      local handle, during
      local res = p:cli(deploy_args(dir), { services_file = file, spawned = function(h) handle = h end,
        on_line = function(_, line)
          if not during and line:find("canary of c: c.1 on the new release, soaking", 1, true) then
            during = assert(hp:state("c.1")).user_weight
            assert(handle:kill("KILL"))
          end
        end })
      assert.is_truthy(during, "the canary never soaked:\n" .. output(res))
      assert.are_not.equal(0, res.exit_code)
      assert.equal(5, during)
      -- the dead run left the canary weight
      assert.equal(5, assert(hp:state("c.1")).user_weight)
      assert.is_true(fs.exists(journal_path))
    end
    local left = "c%.1: its canary weight was not given back: server c%.1 at HAProxy [^\n]* backend cny had weight 50 "
      .. "before the run"

    killed_in_soak()
    -- the next run touches nothing and names the weight left
    local pids = p:pids()
    local again = p:cli({ "--service", "c.2" }, { services_file = file })
    assert.equal(4, again.exit_code, output(again))
    assert.matches(left, again.stderr)
    assert.same(pids, p:pids())
    local rec = p:cli({ "--recover" }, { services_file = file })
    assert.equal(0, rec.exit_code, output(rec))
    -- read back over the admin socket
    local st = assert(hp:state("c.1"))
    assert.equal(50, st.user_weight)
    assert.equal("ready", st.admin)
    local back = events_of(last_run(p), "BALANCER_WEIGHT", "c.1")
    assert.equal(1, #back, output(rec))
    assert.equal(50, back[1].weight)
    assert.equal("recovery: the weight it had before the interrupted run", back[1].reason)
    assert.is_false(fs.exists(journal_path), "the recovery left the run journal")

    -- --abandon forgets the run and says what it leaves as it is
    killed_in_soak()
    local ab = p:cli({ "--abandon" }, { services_file = file })
    assert.equal(0, ab.exit_code, output(ab))
    assert.matches("left as it is: " .. left, ab.stdout .. ab.stderr)
    assert.equal(5, assert(hp:state("c.1")).user_weight)
    assert.is_false(fs.exists(journal_path))
  end)

  it("canary.weight with a balancer script that cannot set weights is refused before anything is touched", function()
    helpers.write(p.dir .. "/noweight-lb.lua", [[
      return { drain = function() return true end, enable = function() return true end }
    ]])
    local file = p:write_services({ groups = { c = { max_unavailable = 1, balancer = "noweight-lb.lua",
      canary = { count = 1, soak = 1, weight = 10 } } } }, p.dir .. "/noweight.lua")
    local before = p:pids()
    local res = p:cli({ "--service", table.concat(MEMBERS, ",") }, { services_file = file })
    assert.equal(2, res.exit_code, output(res))
    assert.matches('group "c": canary%.weight needs a balancer that sets weights: balancer script '
      .. (p.dir .. "/noweight-lb.lua"):gsub("%p", "%%%0") .. " has no weight%(member, w%) function", res.stderr)
    assert.same(before, p:pids())
  end)

  -- A member's unit file and code, as hashes: rel -> "type mode sha256" (without what the
  -- service writes itself, service.log, and the fixture's control file).
  local function hashes(n)
    local svc = p.by_name[n]
    local out = { ["unit file"] = assert(fs.sha256(svc.unit_path)) }
    local function walk(rel)
      local path = rel == "" and svc.working_dir or svc.working_dir .. "/" .. rel
      for _, name in ipairs(assert(fs.list(path))) do
        local r = rel == "" and name or rel .. "/" .. name
        if r ~= "service.log" and not r:match("%.control$") then
          local st = assert(fs.stat(svc.working_dir .. "/" .. r))
          out[r] = ("%s %04o %s"):format(st.type, st.mode & 4095,
            st.type == "file" and assert(fs.sha256(svc.working_dir .. "/" .. r)) or "")
          if st.type == "dir" then walk(r) end
        end
      end
    end
    walk("")
    return out
  end

  local function status_of(file)
    return assert(proc.run({ helpers.engine, "plans/status.lua", "--user", "--services", file },
      { env = { XDG_STATE_HOME = p.xdg_state }, timeout = 30 }))
  end

  it("plans/rollback.lua --group puts a held canary back byte for byte; the group is on one release again", function()
    local file = services_with({ count = 1, soak = 1 }, "held-back")
    -- the canary's definition is known good as it is now (a run of it succeeded)
    local pre = p:cli({ "--service", "c.1" }, { services_file = file })
    assert.equal(0, pre.exit_code, output(pre))
    local before, old = hashes("c.1"), running("c.1")
    -- an edit of the unit that goes out with the canary, and a release that adds, changes and
    -- removes nothing of what the service writes
    helpers.edit(p.by_name["c.1"].unit_path, "%[Service%]", "[Service]\nEnvironment=CANARY_EDIT=1")
    local dir, version = release("held-back", { ["app.lua"] = "return 'new code'\n", ["lib/new.lua"] = "return 2\n" })
    local res = p:cli(deploy_args(dir, { "--canary-only" }), { services_file = file })
    assert.equal(0, res.exit_code, output(res))
    assert.equal(version, running("c.1"))
    assert.are_not.same(before, hashes("c.1"))
    assert.matches("group c: canary held", status_of(file).stdout)
    local pids = p:pids()
    local logged = #p:events()

    local w = watch()
    local rb = p:cli({ "--group", "c" }, { plan = "plans/rollback.lua", services_file = file, timeout = 60 })
    w.stop()
    assert.equal(0, rb.exit_code, output(rb))
    assert.same(before, hashes("c.1"))
    assert.equal(old, running("c.1"))
    assert.are_not.equal(pids["c.1"], p:pids()["c.1"])
    assert.equal("active", p:unit("c.1"):get("ActiveState"))
    local st = assert(hp:state("c.1"))
    assert.equal("ready", st.admin)
    -- drained before its restart, back in rotation once healthy; the others never touched
    assert.is_true(w.drained["c.1"], "the canary was not drained before its rollback")
    for _, n in ipairs(OTHERS) do
      assert.equal(pids[n], p:pids()[n], n)
      assert.is_nil(w.drained[n], n .. " was drained")
    end
    local evs = { table.unpack(p:events(), logged + 1) } -- the rollback's (it has no PLAN_START)
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.1"), output(rb))
    assert.is_truthy(at(evs, "DEFINITION_RESTORED", "c.1"), output(rb))
    assert.is_truthy(at(evs, "DEPLOY_UNDONE", "c.1"), output(rb))
    assert.is_nil(at(evs, "ROLLBACK_START", "c.2"))
    assert.is_false(fs.exists(p.state_root .. "/canary/c.json"), "the held record outlived the rollback")
    local after = status_of(file).stdout
    assert.not_matches("canary held", after)

    -- nothing held any more: said, exit 0, nothing touched
    pids = p:pids()
    local count = #p:events()
    local again = p:cli({ "--group", "c" }, { plan = "plans/rollback.lua", services_file = file, timeout = 60 })
    assert.equal(0, again.exit_code, output(again))
    assert.matches("group c has no held canary %(plans/rolling%.lua %-%-canary%-only%): nothing to roll back",
      again.stdout)
    assert.same(pids, p:pids())
    assert.equal(count, #p:events())
    assert.same(before, hashes("c.1"))
    -- a group the services file does not have
    local unknown = p:cli({ "--group", "nope" }, { plan = "plans/rollback.lua", services_file = file, timeout = 60 })
    assert.equal(2, unknown.exit_code, output(unknown))
    assert.equal(('rrengine: unknown group "nope" in %s\n'):format(file), unknown.stderr)
  end)

  -- The known-good snapshot pointer of a member (the name of its known-good snapshot).
  local function known_good_pointer(n)
    return (assert(fs.read(p.state_root .. "/snapshots/" .. n .. "/current")):gsub("%s+$", ""))
  end

  it("a canary whose soak fails gets its definition from before the run back, byte for byte, and that pointer", function()
    helpers.write(p.dir .. "/never-analysis.lua", [[return function() return false, "not this release" end]])
    local file = services_with({ count = 1, soak = 1, analysis = "never-analysis.lua" }, "soak-definition")
    -- the canary's definition is known good as it is now (a run of it succeeded)
    local pre = p:cli({ "--service", "c.1" }, { services_file = services_with({ count = 1, soak = 0 }, "soak-pre") })
    assert.equal(0, pre.exit_code, output(pre))
    local before, old, pointer = hashes("c.1"), running("c.1"), known_good_pointer("c.1")
    -- an edit of the unit that goes out with the canary (its own flow succeeds with it and makes
    -- it known good), and a release whose soak fails
    helpers.edit(p.by_name["c.1"].unit_path, "%[Service%]", "[Service]\nEnvironment=CANARY_SOAK_EDIT=1")
    local dir, version = release("soak-definition", { ["app.lua"] = "return 'new code'\n", ["lib/new.lua"] = "return 3\n" })
    local before_pids = p:pids()
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    assert.equal("analysis: not this release", events_of(evs, "CANARY_FAILED")[1].error)
    -- the canary's own flow made the edit known good before the soak failed ...
    assert.is_truthy(at(evs, "SERVICE_RESTART_SUCCESS", "c.1"), output(res))
    -- ... and its rollback made the one from before the run known good again, then restored it
    local kg = at(evs, "KNOWN_GOOD_RESTORED", "c.1")
    assert.is_truthy(kg, output(res))
    assert.equal(p.state_root .. "/snapshots/c.1/" .. pointer, evs[kg].snapshot)
    assert.is_true(kg < at(evs, "ROLLBACK_START", "c.1"))
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.1"), output(res))
    assert.same(before, hashes("c.1"))
    assert.equal(pointer, known_good_pointer("c.1"))
    assert.equal(old, running("c.1"))
    assert.are_not.equal(version, running("c.1"))
    assert.is_false(p:unit("c.1"):get("NeedDaemonReload"))
    assert.equal("ready", assert(hp:state("c.1")).admin)
    untouched(evs, before_pids, w, "the canary of group c failed: analysis: not this release")
  end)

  it("count 2: a canary whose own flow fails rolls back the canary already on the new release; the rest untouched", function()
    local file = services_with({ count = 2, soak = 1 }, "count2")
    local pre = p:cli({ "--service", "c.1,c.2" }, { services_file = file })
    assert.equal(0, pre.exit_code, output(pre))
    local before, old, pointer = hashes("c.1"), running("c.1"), known_good_pointer("c.1")
    -- the release breaks c.2's health endpoint only: c.1 (first) passes its flow, c.2 fails its own
    local dir, version = release("count2", { ["c.2.control"] = "status=500\n", ["app.lua"] = "return 'two'\n" })
    local pids = p:pids()
    local load = load_on()
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    local r = load.stop()
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    local failed = events_of(evs, "CANARY_FAILED")
    assert.equal(1, #failed, output(res))
    assert.same({ "c.1", "c.2" }, failed[1].canaries)
    assert.matches("^c%.2: ", failed[1].error)
    assert.is_nil(at(evs, "CANARY_START"), "the canaries soaked")
    -- c.1 was on the new release, then drained, rolled back, back in rotation once healthy
    local ok1, cf = at(evs, "SERVICE_RESTART_SUCCESS", "c.1"), at(evs, "CANARY_FAILED")
    assert.is_truthy(ok1, output(res))
    assert.is_true(ok1 < cf)
    local function after_failure(name)
      return index_of(evs, function(ev) return ev.event == name and ev.service == "c.1" end, cf)
    end
    local drain, rb, enable = after_failure("BALANCER_DRAIN"), after_failure("ROLLBACK_START"),
      after_failure("BALANCER_ENABLE")
    assert.is_truthy(drain, "c.1 was not drained before its rollback:\n" .. output(res))
    assert.is_truthy(rb, output(res))
    assert.is_truthy(enable, output(res))
    assert.is_truthy(after_failure("ROLLBACK_SUCCESS"), output(res))
    -- out of rotation before its restart, back once healthy on the old release
    local healthy = index_of(evs, function(ev) return ev.event == "HEALTH_CHECK_PASSED" and ev.service == "c.1"
      and ev.phase == "rollback" end, cf)
    assert.is_true(drain < rb and rb < healthy and healthy < enable)
    assert.is_truthy(after_failure("DEPLOY_UNDONE"), output(res))
    assert.same(before, hashes("c.1"))
    assert.equal(pointer, known_good_pointer("c.1"))
    assert.equal(old, running("c.1"))
    assert.are_not.equal(pids["c.1"], p:pids()["c.1"])
    -- c.2 rolled back by its own flow; both in rotation; c.3 never touched
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.2"), output(res))
    assert.are_not.equal(version, on_disk("c.2"))
    for _, n in ipairs({ "c.1", "c.2" }) do assert.equal("ready", assert(hp:state(n)).admin, n) end
    assert.equal(pids["c.3"], p:pids()["c.3"])
    assert.is_nil(w.drained["c.3"], "c.3 was drained")
    assert.is_nil(at(evs, "SERVICE_RESTART_START", "c.3"))
    assert.are_not.equal(version, on_disk("c.3"))
    assert.matches("^the canary of group c failed: c%.2: ", events_of(evs, "SERVICE_SKIPPED", "c.3")[1].reason)
    local summary = ("%s %s"):format(res.stdout, res.stderr)
    assert.matches("c%.1", summary)
    assert.is_true(w.max <= 1, "more than one member out of rotation at once")
    -- no client saw it
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
  end)

  it("the analysis sees the canaries and the rest, every soak/4 s and once at the end, where its verdict counts", function()
    local calls = p.dir .. "/analysis.calls"
    os.remove(calls)
    -- relative: resolved against the services file's directory; fails only at its last look
    helpers.write(p.dir .. "/late-analysis.lua", ([[
      local fs = require("rr.fs")
      local cjson = require("cjson")
      local calls = %q
      return function(info)
        assert(fs.write_atomic(calls, (fs.read(calls) or "") .. cjson.encode(info) .. "\n"))
        if info.elapsed > info.soak * 0.9 then return false, "the last look found it wanting" end
        return true
      end
    ]]):format(calls))
    local dir, version = release("late")
    local file = services_with({ count = 1, soak = 2, analysis = "late-analysis.lua" }, "late")
    local before, old = p:pids(), running("c.1")
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    local seen, at_s = {}, {}
    for line in (fs.read(calls) or ""):gmatch("[^\n]+") do
      seen[#seen + 1] = cjson.decode(line)
      at_s[#at_s + 1] = ("%.3f"):format(seen[#seen].elapsed)
    end
    local looks = ("looks at %s s of the soak\n"):format(table.concat(at_s, ", "))
    assert.equal(1, res.exit_code, looks .. output(res))
    local evs = last_run(p)
    local failed = events_of(evs, "CANARY_FAILED")
    assert.equal(1, #failed, output(res))
    assert.equal("analysis: the last look found it wanting", failed[1].error)
    assert.equal(4, #seen, looks)
    for i, info in ipairs(seen) do
      assert.equal("c", info.group)
      assert.equal(2, info.soak)
      -- never before its time (every soak/4 = 0.5 s), the last at the end
      assert.is_true(info.elapsed >= 0.5 * i - 0.05, looks)
      assert.same({ { name = "c.1", unit = p.by_name["c.1"].unit, url = p.by_name["c.1"].url, server = "c.1" } },
        info.canaries)
      assert.same({ "c.2", "c.3" }, { info.others[1].name, info.others[2].name })
      assert.equal(p.by_name["c.3"].url, info.others[2].url)
    end
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.1"), output(res))
    assert.equal(old, running("c.1"))
    assert.are_not.equal(version, on_disk("c.1"))
    untouched(evs, before, w, "the canary of group c failed: " .. failed[1].error)
  end)

  it("an analysis that raises fails the canary with its error", function()
    helpers.write(p.dir .. "/raises-analysis.lua", [[
      return function(info) error("metrics backend unreachable for " .. info.canaries[1].name, 0) end
    ]])
    local dir = release("raises")
    local file = services_with({ count = 1, soak = 1, analysis = "raises-analysis.lua" }, "raises")
    local before, old = p:pids(), running("c.1")
    local w = watch()
    local res = p:cli(deploy_args(dir), { services_file = file })
    w.stop()
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    local failed = events_of(evs, "CANARY_FAILED")
    assert.equal(1, #failed, output(res))
    assert.matches("^analysis error: .*metrics backend unreachable for c%.1", failed[1].error)
    assert.matches("metrics backend unreachable for c%.1", res.stdout .. res.stderr)
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.1"), output(res))
    assert.equal(old, running("c.1"))
    untouched(evs, before, w, "the canary of group c failed: " .. failed[1].error)
  end)

  it("a canary that crashes during the soak fails it, naming the unit, and is rolled back", function()
    -- the release ships c.1's control file, so that its rollback removes it whatever it says then
    local dir, version = release("crash", { ["c.1.control"] = "# shipped by the release\n" })
    local file = services_with({ count = 1, soak = 20 }, "crash")
    local before, old = p:pids(), running("c.1")
    local w = watch()
    local crashed = false
    local res = p:cli(deploy_args(dir), { services_file = file, on_line = function(_, line)
      -- the live view's line for CANARY_START: the canary soaks now; it exits at once
      if not crashed and line:find("canary of c: c.1 on the new release, soaking", 1, true) then
        crashed = true
        p:control("c.1", { exit = 1 })
      end
    end })
    w.stop()
    assert.is_true(crashed, "no CANARY_START line:\n" .. output(res))
    assert.equal(1, res.exit_code, output(res))
    local evs = last_run(p)
    local failed = events_of(evs, "CANARY_FAILED")
    assert.equal(1, #failed, output(res))
    -- the unit signal, not the end of the soak nor a probe: whichever of the unit's properties
    -- systemd reports first (MainPID 0, or ActiveState failed; or failed already when the soak
    -- began watching)
    local reason = failed[1].error
    assert.is_truthy(reason:find("^canary c%.1 left active %(failed%)")
      or reason:find("^canary c%.1: its main process exited %(MainPID %d+ %-> 0%)")
      or reason:find("^canary c%.1 is failed at the start of the soak"), reason)
    assert.matches("canary c%.1", res.stdout .. res.stderr)
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS", "c.1"), output(res))
    assert.equal("active", p:unit("c.1"):get("ActiveState"))
    assert.equal(old, running("c.1"))
    assert.equal(old, on_disk("c.1"))
    assert.are_not.equal(version, running("c.1"))
    untouched(evs, before, w, "the canary of group c failed: " .. reason)
  end)
end)

-- What the spec above relies on: the fixture's /app with error_share and its /metrics.
describe("the fixture's application and metrics endpoints", function()
  local dir, f
  setup(function()
    dir = assert(fs.mkdtemp("/tmp/rr-canary-fixture-"))
    f = hx.fixture({ "--control-file", dir .. "/control" })
  end)
  teardown(function()
    if f then f:stop() end
    fs.remove_tree(dir)
  end)

  local function metrics()
    local res = assert(http.get(("http://127.0.0.1:%d/metrics"):format(f.port)))
    assert.equal(200, res.status)
    return tonumber(res.body:match("\nhttp_requests_total (%d+)\n")),
      tonumber(res.body:match("\nhttp_responses_5xx_total (%d+)\n"))
  end

  it("error_share=20 answers 500 on every fifth /app, and /metrics counts every answer but its own", function()
    local requests0, errors0 = metrics()
    units.control(dir .. "/control", { error_share = 20 })
    local statuses = {}
    for i = 1, 10 do statuses[i] = assert(http.get(("http://127.0.0.1:%d/app"):format(f.port))).status end
    assert.same({ 200, 200, 200, 200, 500, 200, 200, 200, 200, 500 }, statuses)
    assert(http.get(("http://127.0.0.1:%d/health"):format(f.port)))
    local requests, errors = metrics()
    assert.equal(requests0 + 11, requests)
    assert.equal(errors0 + 2, errors)
    units.control(dir .. "/control", nil)
    for _ = 1, 10 do assert.equal(200, assert(http.get(("http://127.0.0.1:%d/app"):format(f.port))).status) end
    assert.equal(errors0 + 2, select(2, metrics()))
  end)
end)
