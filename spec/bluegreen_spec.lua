-- Blue-green releases end to end: a template unit of the sandboxed user manager with two
-- instances (@blue, @green), each with its own working dir and port, behind a real HAProxy, a
-- release deployed by plans/rolling.lua as an operator runs it, under a real wrk load.
--   spec/support/run-specs ./rrengine spec/bluegreen_spec.lua
local fs = require("rr.fs")
local cjson = require("cjson")
local bgp = require("spec.support.bluegreen")
local helpers = require("spec.support.helpers")
local units = require("spec.support.units")
local platform = require("spec.support.platform")

local events_of = helpers.events_of

local function output(res)
  return ("exit %s\nstdout:\n%s\nstderr:\n%s"):format(tostring(res.exit_code), res.stdout or "", res.stderr or "")
end

local function at(evs, name, service)
  for i, ev in ipairs(evs) do
    if ev.event == name and (service == nil or ev.service == service) then return i end
  end
end

-- The events of the latest run of s.
local function last_run(s)
  return helpers.last_run(s.p)
end

describe("a blue-green service behind a real HAProxy, under a real wrk load", function()
  local s

  setup(function()
    s = bgp.new({ soak = 2 })
  end)

  teardown(function()
    if s then s:teardown() end
  end)

  it("a release goes to the idle colour, takes the traffic with no failed request, and the old colour stops", function()
    local dir, version = s:release("good")
    local blue_tree = bgp.tree(s.colours.blue.working_dir)
    assert.is_nil(s:live())
    assert.equal("inactive", s:active("green"))
    local load = s:load()
    local w = s:watch("blue")
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)

    -- the new release runs in green, which serves; blue stopped, its code untouched
    assert.equal("green", s:live())
    assert.equal("active", s:active("green"))
    assert.equal(version, s:running("green"))
    assert.equal(version, s:on_disk("green"))
    assert.equal("inactive", s:active("blue"))
    assert.equal(blue_tree, bgp.tree(s.colours.blue.working_dir))
    assert.equal("ready", s:admin("green"))
    assert.equal("drain", s:admin("blue"))
    assert.is_true(w.seen.ready, "blue never served during the release")

    local evs = last_run(s)
    local start, switched, passed = at(evs, "BLUEGREEN_START"), at(evs, "BLUEGREEN_SWITCHED"), at(evs, "BLUEGREEN_PASSED")
    assert.is_truthy(start, output(res))
    assert.equal("blue", evs[start].live)
    assert.equal("green", evs[start].idle)
    assert.is_truthy(switched, output(res))
    assert.equal("blue", evs[switched].from)
    assert.equal("green", evs[switched].to)
    assert.is_truthy(passed, output(res))
    -- deployed and checked before the switch; the old colour stopped after the soak
    local post
    for i, ev in ipairs(evs) do
      if ev.event == "HEALTH_CHECK_PASSED" and ev.phase == "post" then post = i end
    end
    assert.is_true(at(evs, "DEPLOY_END") < post and post < switched)
    assert.equal(s.colours.green.working_dir, evs[at(evs, "DEPLOY_START")].target)
    local soak = at(evs, "BLUEGREEN_SOAK")
    assert.is_true(switched < soak)
    local stop
    for i, ev in ipairs(evs) do
      if ev.event == "UNIT_JOB_DONE" and ev.method == "stop" and ev.unit == s.colours.blue.unit then stop = i end
    end
    assert.is_truthy(stop, "blue was never stopped")
    assert.is_true(soak < stop and stop < passed)
    assert.is_nil(at(evs, "ROLLBACK_START"))
  end)

  it("the live colour survives the engine: the next release deploys into the other colour", function()
    assert.equal("green", s:live())
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local dir, version = s:release("second")
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("blue", s:live())
    assert.equal(version, s:running("blue"))
    assert.equal(version, s:on_disk("blue"))
    assert.equal("inactive", s:active("green"))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    assert.equal("ready", s:admin("blue"))
    assert.equal("drain", s:admin("green"))
  end)

  it("a restart without --deploy serves the same release from the other colour, never the older one it held", function()
    -- blue is live with "second"; green still holds "good" on disk
    assert.equal("blue", s:live())
    local version = s:running("blue")
    assert.are_not.equal(version, s:on_disk("green"))
    local blue_tree = bgp.tree(s.colours.blue.working_dir)
    local load = s:load()
    local res = s:cli({ "--service", "web" })
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.equal("green", s:live())
    assert.equal(version, s:running("green"))
    assert.equal(version, s:on_disk("green"))
    assert.equal(blue_tree, bgp.tree(s.colours.blue.working_dir))
    assert.equal(blue_tree, bgp.tree(s.colours.green.working_dir))
    local evs = last_run(s)
    assert.equal(s.colours.blue.working_dir, evs[at(evs, "DEPLOY_START")].source)
    assert.equal(s.colours.green.working_dir, evs[at(evs, "DEPLOY_START")].target)
    -- back to blue for the cases below, with the same release
    res = s:cli({ "--service", "web" })
    assert.equal(0, res.exit_code, output(res))
    assert.equal("blue", s:live())
    assert.equal(version, s:running("blue"))
  end)

  it("the dry run names the steps: the live colour, deploy and start of the idle one, switch, soak, stop", function()
    local dir = s:release("dry")
    local before = bgp.tree(s.colours.green.working_dir)
    local res = s:cli({ "--service", "web", "--dry-run", "--deploy", "--deploy-path", dir })
    assert.equal(0, res.exit_code, output(res))
    local out = res.stdout
    assert.matches("blue: [^\n]*active[^\n]*<%- live %(recorded%)", out)
    assert.matches("green: [^\n]*inactive[^\n]*%(idle%)", out)
    assert.matches("deploy: rsync %-a [^\n]* %-> " .. s.colours.green.working_dir:gsub("%p", "%%%0") .. "/ %(the idle colour green", out)
    assert.matches("start [^\n]*@green%.service", out)
    assert.matches("switch: web_green ready, web_blue drained", out)
    assert.matches("soak 2s with the traffic", out)
    assert.matches("stop the old colour [^\n]*@blue%.service", out)
    assert.equal(before, bgp.tree(s.colours.green.working_dir))
    assert.equal("blue", s:live())
  end)

  it("a new colour that fails its post-check is stopped and undone before any switch: nobody noticed", function()
    assert.equal("blue", s:live())
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local blue_pid = s:unit("blue"):get("MainPID")
    -- the release breaks its own health endpoint
    local dir = s:release("broken", { ["app.control"] = "status=500\n" })
    local load = s:load()
    local w = s:watch("blue")
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    w.stop()
    local r = load.stop()
    assert.equal(1, res.exit_code, output(res))
    assert.matches("the idle colour green is unhealthy on the new release", res.stdout .. res.stderr)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    -- the live colour was never out of rotation, never restarted
    assert.same({ ready = true }, w.seen)
    assert.equal(blue_pid, s:unit("blue"):get("MainPID"))
    assert.equal("blue", s:live())
    assert.equal("inactive", s:active("green"))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    local evs = last_run(s)
    assert.is_nil(at(evs, "BLUEGREEN_SWITCHED"))
    local failed = events_of(evs, "BLUEGREEN_FAILED")
    assert.equal(1, #failed)
    assert.equal("before the switch", failed[1].stage)
    assert.is_truthy(at(evs, "ROLLBACK_SUCCESS"), output(res))
    assert.is_truthy(at(evs, "DEPLOY_UNDONE"), output(res))
  end)

  it("an analysis that fails during the soak switches back first, then stops and undoes the new colour", function()
    assert.equal("blue", s:live())
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local blue_pid = s:unit("blue"):get("MainPID")
    local analysis = helpers.write(s.dir .. "/analysis.lua",
      "return function(info) return false, 'synthetic: error budget spent on ' .. info.live.colour end\n")
    local file = s:write_services({ blue_green = { analysis = analysis, soak = 3 } }, s.dir .. "/analysis-services.lua")
    local dir, version = s:release("soakfail")
    local load = s:load()
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir }, { services_file = file })
    local r = load.stop()
    assert.equal(1, res.exit_code, output(res))
    assert.matches("analysis: synthetic: error budget spent on green", res.stdout .. res.stderr)
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    -- the traffic is back on blue, which kept running; green stopped, its code as it was
    assert.equal("blue", s:live())
    assert.equal("ready", s:admin("blue"))
    assert.equal("drain", s:admin("green"))
    assert.equal(blue_pid, s:unit("blue"):get("MainPID"))
    assert.equal("inactive", s:active("green"))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    assert.are_not.equal(version, s:on_disk("green"))
    local evs = last_run(s)
    local switches = events_of(evs, "BLUEGREEN_SWITCHED")
    assert.equal(2, #switches, output(res))
    assert.equal("green", switches[1].to)
    assert.equal("blue", switches[2].to)
    assert.is_true(switches[2].back)
    -- back first: the switch back comes before the stop of green
    local back = at(evs, "ROLLBACK_START")
    local stop
    for i, ev in ipairs(evs) do
      if ev.event == "UNIT_JOB_DONE" and ev.method == "stop" and ev.unit == s.colours.green.unit and i > back then
        stop = i
      end
    end
    local switched_back
    for i, ev in ipairs(evs) do if ev.event == "BLUEGREEN_SWITCHED" and ev.back then switched_back = i end end
    assert.is_truthy(stop, output(res))
    assert.is_true(back < switched_back and switched_back < stop)
    local failed = events_of(evs, "BLUEGREEN_FAILED")
    assert.equal(1, #failed)
    assert.equal("after the switch", failed[1].stage)
  end)

  it("an engine killed during the soak: the next run exits 4; --recover switches back and undoes", function()
    assert.equal("blue", s:live())
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local file = s:write_services({ blue_green = { soak = 60 } }, s.dir .. "/long-soak.lua")
    local dir = s:release("killed")
    local load = s:load()
    local handle
    local seen = #s.p:events() -- the log keeps the earlier releases
    local killer = require("rr").spawn(function()
      assert(helpers.eventually(function() return handle ~= nil end, 10))
      local switched = helpers.eventually(function()
        local evs = s.p:events()
        for i = seen + 1, #evs do
          if evs[i].event == "BLUEGREEN_SOAK" and evs[i].live == "green" then return true end
        end
      end, 60)
      assert(switched, "the release never reached its soak")
      assert(handle:kill("KILL"))
    end)
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir },
      { services_file = file, spawned = function(h) handle = h end })
    assert(require("rr").wait(killer))
    assert.are_not.equal(0, res.exit_code)
    -- killed after the switch: green serves the new release, blue still runs
    assert.equal("green", s:live())
    assert.equal("ready", s:admin("green"))
    assert.equal("active", s:active("blue"))

    local again = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir }, { services_file = file })
    assert.equal(4, again.exit_code, output(again))
    assert.matches("web: left in phase bg%-soak", again.stderr .. again.stdout)
    assert.matches("traffic had switched from blue to green", again.stderr .. again.stdout)

    local rec = s:cli({ "--recover" }, { services_file = file })
    local r = load.stop()
    assert.equal(1, rec.exit_code, output(rec))
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.equal("blue", s:live())
    assert.equal("ready", s:admin("blue"))
    assert.equal("drain", s:admin("green"))
    assert.equal("inactive", s:active("green"))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    local evs = last_run(s)
    local ok = events_of(evs, "RECOVERY_SUCCESS", "web")
    assert.equal(1, #ok, output(rec))
    assert.equal("switched_back", ok[1].action)
    -- resolved: a next run goes
    local dry = s:cli({ "--service", "web", "--dry-run" }, { services_file = file })
    assert.equal(0, dry.exit_code, output(dry))
  end)

  it("bad declarations: one line naming the service and the field, exit 2, nothing touched", function()
    local blue_pid = s:unit("blue"):get("MainPID")
    local cases = {
      { { service = { unit = "plain.service" } }, 'service "web": field "unit" is not a valid systemd unit name: '
        .. '"plain.service" must be a template unit' },
      { { blue_green = { green = { working_dir = s.colours.blue.working_dir, health = { url = s.colours.green.url },
          balancer_server = "web_green" } } },
        'service "web": field "blue_green.green.working_dir" is the same as blue_green.blue\'s' },
      { { blue_green = { balancer = false } }, 'service "web": blue_green: field "balancer" must be' },
      { { blue_green = { soak = -1 } }, 'service "web": field "blue_green.soak" must be a number' },
      { { service = { working_dir = "/srv" } }, 'service "web": field "working_dir" cannot go with "blue_green"' },
    }
    for i, case in ipairs(cases) do
      local file = s:write_services(case[1], ("%s/bad-%d.lua"):format(s.dir, i))
      local res = s:cli({ "--service", "web" }, { services_file = file })
      assert.equal(2, res.exit_code, output(res))
      local lines = {}
      for line in res.stderr:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal(1, #lines, output(res))
      assert.is_truthy(lines[1]:find(case[2], 1, true), output(res))
    end
    assert.equal(blue_pid, s:unit("blue"):get("MainPID"))
    assert.equal("blue", s:live())
  end)

  it("no live colour recorded and both colours active: refused (exit 2) naming both states, nothing touched", function()
    local record = s.p.state_root .. "/bluegreen/web.live"
    assert(os.remove(record))
    s:start("green")
    local pids = { blue = s:unit("blue"):get("MainPID"), green = s:unit("green"):get("MainPID") }
    local res = s:cli({ "--service", "web" })
    assert.equal(2, res.exit_code, output(res))
    assert.matches("no live colour recorded and [^\n]*@blue%.service is active, [^\n]*@green%.service is active: stop "
      .. "the one that does not serve", res.stderr)
    assert.equal(pids.blue, s:unit("blue"):get("MainPID"))
    assert.equal(pids.green, s:unit("green"):get("MainPID"))
    assert.is_nil(s:live())
    -- one active instance is the live one: the release goes to the other
    assert(s:unit("green"):stop("replace"))
    local res2 = s:cli({ "--service", "web" })
    assert.equal(0, res2.exit_code, output(res2))
    assert.equal("green", s:live())
    assert.equal("inactive", s:active("blue"))
  end)

  it("plans/status.lua shows each colour, the live one named; the stopped idle colour is no failure", function()
    assert.equal("green", s:live())
    local h = assert(require("rr.proc").spawn({ helpers.engine, "plans/status.lua", "--user", "--services",
      s.services_file }, { env = { XDG_STATE_HOME = s.p.xdg_state }, timeout = 60 }))
    local done, _, _, r = h:wait()
    local res = done or r
    assert.equal(0, res.exit_code, output(res))
    assert.matches("web %[green, live%]%s+[^\n]*@green%.service%s+active", res.stdout)
    assert.matches("web %[blue, idle%]%s+[^\n]*@blue%.service%s+inactive", res.stdout)
  end)

  it("an old colour that does not stop after a good switch: a warning, the release stands, the summary says so", function()
    assert.equal("green", s:live())
    -- systemd refuses to stop green on request: the stop job of the release fails
    local dropin = units.dir() .. "/" .. s.colours.green.unit .. ".d/refuse-stop.conf"
    helpers.write(dropin, "[Unit]\nRefuseManualStop=yes\n")
    assert(platform.manager():daemon_reload())
    local dir, version = s:release("stuck-old")
    local load = s:load()
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir })
    local r = load.stop()
    assert(os.remove(dropin))
    assert(platform.manager():daemon_reload())
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    -- the release stands: blue serves the new release; green still runs, out of rotation
    assert.equal("blue", s:live())
    assert.equal(version, s:running("blue"))
    assert.equal("ready", s:admin("blue"))
    assert.equal("drain", s:admin("green"))
    assert.equal("active", s:active("green"))
    local evs = last_run(s)
    assert.is_nil(at(evs, "ROLLBACK_START"), output(res))
    local passed = events_of(evs, "BLUEGREEN_PASSED")
    assert.equal(1, #passed, output(res))
    assert.matches("^the old colour green %([^)]*@green%.service%) did not stop: .+; the release stands %(blue serves%): "
      .. "stop it by hand %(systemctl %-%-user stop [^)]*@green%.service%)$", passed[1].old_running)
    assert.matches("blue%-green web passed: blue live, but the old colour green still runs", res.stdout)
    assert.matches("\nweb succeeded, but: the old colour green [^\n]*did not stop", res.stdout)
    -- what the summary says by hand works
    assert(s:unit("green"):stop("replace"))
  end)

  it("a switch back to an old colour that is unhealthy: traffic stays on the new one, exit 3, manual steps", function()
    assert.equal("blue", s:live())
    assert.equal("inactive", s:active("green"))
    -- the analysis fails at its last look, once the old colour (blue) went bad meanwhile
    local analysis = helpers.write(s.dir .. "/late-analysis.lua", "return function(info) "
      .. "if info.elapsed < info.soak * 0.9 then return true end return false, 'synthetic: too late' end\n")
    local file = s:write_services({ blue_green = { analysis = analysis, soak = 2 } }, s.dir .. "/late-services.lua")
    local dir, version = s:release("no-way-back")
    local blue_control = s.colours.blue.working_dir .. "/app.control"
    local blue_pid = s:unit("blue"):get("MainPID")
    local green_tree = bgp.tree(s.colours.green.working_dir)
    local load = s:load()
    local broke = false
    local res = s:cli({ "--service", "web", "--deploy", "--deploy-path", dir }, { services_file = file,
      on_line = function(_, line)
        if not broke and line:find("blue-green web: green serves, soaking", 1, true) then
          broke = true
          helpers.write(blue_control, "status=500\n")
        end
      end })
    local r = load.stop()
    assert(os.remove(blue_control))
    assert.is_true(broke, "no soak line:\n" .. output(res))
    assert.equal(3, res.exit_code, output(res))
    -- no client saw it: green kept the traffic
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    assert.equal("green", s:live())
    assert.equal("ready", s:admin("green"))
    assert.equal("drain", s:admin("blue"))
    assert.equal("active", s:active("green"))
    assert.equal(version, s:running("green"))
    assert.equal(blue_pid, s:unit("blue"):get("MainPID"))
    local evs = last_run(s)
    local failed = events_of(evs, "ROLLBACK_FAILED")
    assert.equal(1, #failed, output(res))
    assert.matches("^cannot switch back: the old colour blue %([^)]*@blue%.service%) is unhealthy", failed[1].error)
    assert.equal(1, #events_of(evs, "BLUEGREEN_SWITCHED"), "traffic switched back")
    -- the steps an operator types, printed
    local out = res.stdout .. res.stderr
    assert.matches("ROLLBACK FAILED: cannot switch back", out)
    assert.matches("manual steps:", out)
    assert.matches("once [^\n]*@blue%.service serves again: echo 'set server web/web_blue state ready' | socat stdio ",
      out)
    assert.matches("set server web/web_green state drain", out)
    assert.matches("plans/rollback%.lua[^\n]* %-%-service web %-%-deploy%-record ", out)

    -- the manual steps, as an operator types them once blue serves again, end on blue
    assert(s.hp:ready(s.colours.blue.server))
    assert(s.hp:drain(s.colours.green.server))
    assert(s:unit("green"):stop("replace"))
    local live_file = assert(out:match("echo blue > (%S+)"), out)
    helpers.write(live_file, "blue\n")
    local record = assert(out:match("%-%-deploy%-record (%S+)"), out)
    local undo = s:cli({ "--service", "web", "--deploy-record", record }, { plan = "plans/rollback.lua", timeout = 60 })
    assert.equal(0, undo.exit_code, output(undo))
    assert.equal(green_tree, bgp.tree(s.colours.green.working_dir))
    assert.equal("blue", s:live())
    assert.equal(blue_pid, s:unit("blue"):get("MainPID"))
  end)

  it("plans/rollback.lua --service: back to the release the other colour still has, under wrk, no failed request", function()
    -- as an operator finds it: two good releases in a row, the earlier one in the idle colour
    assert(helpers.eventually(function() return s:running("blue") ~= nil end, 10))
    local first_dir, first = s:release("first")
    local a = s:cli({ "--service", "web", "--deploy", "--deploy-path", first_dir })
    assert.equal(0, a.exit_code, output(a))
    local second_dir, second = s:release("second")
    local b = s:cli({ "--service", "web", "--deploy", "--deploy-path", second_dir })
    assert.equal(0, b.exit_code, output(b))
    local live = s:live()
    local prev = live == "blue" and "green" or "blue"
    assert.equal(second, s:running(live))
    assert.equal(first, s:on_disk(prev))
    assert.equal("inactive", s:active(prev))
    local trees = { blue = bgp.tree(s.colours.blue.working_dir), green = bgp.tree(s.colours.green.working_dir) }
    local logged = #s.p:events()

    local load = s:load()
    local w = s:watch(live)
    local res = s:cli({ "--service", "web" }, { plan = "plans/rollback.lua", timeout = 60 })
    w.stop()
    local r = load.stop()
    assert.equal(0, res.exit_code, output(res))
    assert.is_true(r.requests > 100, r.output)
    assert.equal(0, r.non2xx, r.output)
    assert.equal(0, r.socket_errors, r.output)
    -- the earlier release serves from the other colour; the later one stopped; no code changed
    assert.equal(prev, s:live())
    assert.equal(first, s:running(prev))
    assert.equal("ready", s:admin(prev))
    assert.equal("drain", s:admin(live))
    assert.equal("inactive", s:active(live))
    assert.is_true(w.seen.ready, live .. " never served during the rollback")
    assert.equal(trees.blue, bgp.tree(s.colours.blue.working_dir))
    assert.equal(trees.green, bgp.tree(s.colours.green.working_dir))
    assert.is_false(fs.exists(require("rr.state").journal_path(s.p.state_root)))
    -- the steps of a release: started and checked out of rotation, then the switch, then the stop
    local evs = { table.unpack(s.p:events(), logged + 1) }
    local start = at(evs, "BLUEGREEN_START")
    assert.is_truthy(start, output(res))
    assert.is_true(evs[start].rollback)
    local post, enable, switched, stop
    for i, ev in ipairs(evs) do
      if ev.event == "HEALTH_CHECK_PASSED" and ev.phase == "post" and ev.unit == s.colours[prev].unit then post = i end
      if ev.event == "BALANCER_ENABLE" and ev.server == s.colours[prev].server then enable = enable or i end
      if ev.event == "BLUEGREEN_SWITCHED" then switched = i end
      if ev.event == "UNIT_JOB_DONE" and ev.method == "stop" and ev.unit == s.colours[live].unit then stop = i end
    end
    assert.is_truthy(post and enable and switched and stop, output(res))
    assert.is_true(start < post and post < enable and enable < switched and switched < stop)
    assert.equal(live, evs[switched].from)
    assert.equal(prev, evs[switched].to)
    assert.matches("blue%-green web passed: " .. prev .. " live", res.stdout)

    -- --no-code and --deploy-record mean nothing here: refused, nothing touched
    local pid = s:unit(prev):get("MainPID")
    local bad = s:cli({ "--service", "web", "--no-code" }, { plan = "plans/rollback.lua", timeout = 60 })
    assert.equal(2, bad.exit_code, output(bad))
    assert.matches('service "web" is blue%-green', bad.stderr)
    assert.equal(pid, s:unit(prev):get("MainPID"))

    -- the REPL's restart() restarts it as plans/rolling.lua does: the same release, from the
    -- other colour, never a colour restarted in place
    local version = s:running(prev)
    local repl = assert(require("rr.proc").run({ helpers.engine, "-i" }, { stdin = 'print(restart("web"))\n', timeout = 120,
      env = { XDG_STATE_HOME = s.p.xdg_state, HOME = s.dir, RRENGINE_SERVICES = s.services_file, RRENGINE_USER = "1" } }))
    assert.matches("ok: web restarted", repl.stdout)
    assert.equal(live, s:live())
    assert.equal(version, s:running(live))
    assert.equal("inactive", s:active(prev))
  end)
end)
