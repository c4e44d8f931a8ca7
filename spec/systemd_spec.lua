-- Specs for rr.systemd (engine/systemd*.c) against a real systemd user manager.
--
--   spec/support/sandbox run -- env RRENGINE_ROOT=$PWD ./rrengine /usr/bin/busted spec/systemd_spec.lua
--
-- Needs the engine as the interpreter (rr.systemd is C) and the sandbox's variables. Without
-- them the suite fails, touching nothing: a suite that skips itself when the module does not
-- load would hide a broken module, and outside a sandbox no spec may touch the caller's own
-- user manager.
local ok_rr, rr = pcall(require, "rr")
local ok_sd, systemd = pcall(require, "rr.systemd")

local UNIT_DIR = os.getenv("RR_SANDBOX_UNIT_DIR")
local ENGINE = os.getenv("RR_ENGINE") or (arg and arg[-1])

if not (ok_rr and ok_sd and UNIT_DIR and UNIT_DIR ~= "" and type(systemd.user) == "function") then
  describe("rr.systemd", function()
    it("runs with the rrengine interpreter inside spec/support/sandbox", function()
      assert(ok_rr, "require('rr') failed: " .. tostring(rr))
      assert(ok_sd, "require('rr.systemd') failed: " .. tostring(systemd))
      assert(type(systemd.user) == "function", "rr.systemd has no user() function")
      assert(UNIT_DIR and UNIT_DIR ~= "", "RR_SANDBOX_UNIT_DIR is not set: run this spec through "
        .. "spec/support/run-specs (a sandboxed user manager), never against your own")
    end)
  end)
  return
end

-- Unit names carry a per-run prefix so that reruns in a kept sandbox do not collide.
local PREFIX = "rrsd" .. tostring(os.time() % 100000) .. "-"
local written = {} -- unit name -> true: files to remove and units to stop at the end

local function unit_name(base)
  return PREFIX .. base .. ".service"
end

local function write_file(path, text)
  local f = assert(io.open(path .. ".tmp", "w"))
  assert(f:write(text))
  assert(f:close())
  assert(os.rename(path .. ".tmp", path))
end

-- Write a unit file; service and unit are lists of lines for [Service] and [Unit].
-- StartLimitIntervalSec=0 unless opts.start_limit (the start-limit spec needs the limit).
local function write_unit(base, service, unit, opts)
  local name = unit_name(base)
  local lines = { "[Unit]", "Description=rr.systemd spec " .. base }
  if not (opts and opts.start_limit) then lines[#lines + 1] = "StartLimitIntervalSec=0" end
  for _, l in ipairs(unit or {}) do lines[#lines + 1] = l end
  lines[#lines + 1] = "[Service]"
  for _, l in ipairs(service) do lines[#lines + 1] = l end
  write_file(UNIT_DIR .. "/" .. name, table.concat(lines, "\n") .. "\n")
  written[name] = true
  return name
end

-- A fixture service (spec/support/fixture.c) whose shutdown takes stop_delay seconds after
-- SIGTERM, as a service draining its connections does (TimeoutStopSec= stays at its 90 s).
local function slow_stopper(base, stop_delay, extra_service)
  local units = require("spec.support.units")
  local name = unit_name(base)
  units.fixture_unit(name, units.free_port(), { type = "notify", stop_delay = stop_delay,
    extra_service = extra_service })
  written[name] = true
  return name
end

local function sleeper(base, extra, unit)
  local service = { "ExecStart=/bin/sleep 1000" }
  for _, l in ipairs(extra or {}) do service[#service + 1] = l end
  return write_unit(base, service, unit)
end

-- A service whose main process ignores SIGHUP, so ExecReload=kill -HUP keeps it. Type=forking:
-- the start job ends once the shell exited, after the ignored disposition was set and inherited.
local function reloadable(base)
  return write_unit(base, {
    "Type=forking",
    [[ExecStart=/bin/sh -c "trap '' HUP; /bin/sleep 1000 &"]],
    "ExecReload=/bin/kill -HUP $MAINPID",
  })
end

-- Append a line to a unit file, as an operator editing it would.
local function append_line(path, line)
  local f = assert(io.open(path, "a"))
  assert(f:write(line .. "\n"))
  assert(f:close())
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

describe("rr.systemd", function()
  local m

  setup(function()
    m = assert(systemd.user())
  end)

  teardown(function()
    if m then
      for name in pairs(written) do
        local u = m:unit(name)
        if u then u:stop() ; u:reset_failed() end
        os.remove(UNIT_DIR .. "/" .. name)
        local dropins = UNIT_DIR .. "/" .. name .. ".d"
        os.remove(dropins .. "/10-spec.conf")
        os.remove(dropins)
      end
      m:daemon_reload()
      m:close()
    end
  end)

  -- A loaded handle on a unit written just before.
  local function load(name)
    assert(m:daemon_reload())
    return assert(m:unit(name))
  end

  describe("connections", function()
    it("connects to the user manager and says so", function()
      assert.matches("^rr%.systemd%.manager %(user%)$", tostring(m))
      assert.equal("user", m:scope())
    end)

    it("is closed by close() and <close>, idempotently; using it then raises", function()
      local m2 = assert(systemd.user())
      do
        local m3 <close> = assert(systemd.user())
        assert.equal("user", m3:scope())
      end
      m2:close()
      m2:close()
      assert.matches("closed", tostring(m2))
      assert.has_error(function() m2:unit("x.service") end)
    end)

    it("fails the pending waits of a connection that is closed", function()
      local name = sleeper("closing")
      assert(m:daemon_reload())
      local m2 = assert(systemd.user())
      local u = assert(m2:unit(name))
      local t = rr.spawn(function() return u:wait_state("active", 30) end)
      rr.spawn(function() rr.sleep(0.05); m2:close() end)
      local ok, v1, v2, v3 = rr.wait(t)
      assert.is_true(ok)
      assert.is_nil(v1)
      assert.matches("closed", v2)
      assert.equal("closed", v3)
      assert.has_error(function() u:start() end)
    end)

    it("reports a manager it cannot reach", function()
      assert(ENGINE, "the engine's path is unknown: set RR_ENGINE (spec/support/run-specs does)")
      local empty = os.tmpname()
      os.remove(empty)
      assert(os.execute("mkdir -m 0700 " .. shell_quote(empty)))
      local p = assert(io.popen("env -u DBUS_SESSION_BUS_ADDRESS XDG_RUNTIME_DIR=" .. shell_quote(empty) .. " "
        .. shell_quote(ENGINE) .. " -e " .. shell_quote(
          "print(require('rr.systemd').user())") .. " 2>&1"))
      local out = p:read("a")
      p:close()
      os.remove(empty)
      assert.matches("^nil\tcannot connect to the user manager: .*systemd/private: No such file or directory", out)
    end)

    it("works through the session bus too (sender-matched signals)", function()
      assert(ENGINE, "the engine's path is unknown: set RR_ENGINE (spec/support/run-specs does)")
      assert(os.getenv("DBUS_SESSION_BUS_ADDRESS"), "DBUS_SESSION_BUS_ADDRESS is not set: the sandbox "
        .. "provides a session bus (dbus-user-session, `make deps`); without it this path goes untested")
      local name = sleeper("viabus")
      assert(m:daemon_reload())
      -- No systemd/private in this XDG_RUNTIME_DIR: the engine falls back to the session bus.
      local empty = os.tmpname()
      os.remove(empty)
      assert(os.execute("mkdir -m 0700 " .. shell_quote(empty)))
      local code = ([[
        local sd = require('rr.systemd')
        local m = assert(sd.user())
        local u = assert(m:unit(%q))
        assert(u:start())
        local before = u:get('MainPID')
        local ok, res = u:restart()
        assert(ok and res == 'done', 'restart: ' .. tostring(res))
        assert(u:get('MainPID') ~= before, 'MainPID unchanged')
        local t = require('rr').spawn(function() return u:wait_state('inactive', 5) end)
        assert(u:stop())
        assert(select(2, require('rr').wait(t)) == true)
        print('ok via bus')
      ]]):format(name)
      local p = assert(io.popen("env XDG_RUNTIME_DIR=" .. shell_quote(empty) .. " "
        .. shell_quote(ENGINE) .. " -e " .. shell_quote(code) .. " 2>&1"))
      local out = p:read("a")
      p:close()
      os.remove(empty)
      assert.equal("ok via bus\n", out)
    end)
  end)

  describe("units and properties", function()
    it("loads a unit and names it", function()
      local name = sleeper("named")
      local u = load(name)
      assert.equal(name, u:name())
      assert.equal(name, u:id())
      assert.matches("^/org/freedesktop/systemd1/unit/", u:path())
      assert.is_truthy(tostring(u):find(name, 1, true))
    end)

    it("gives a handle on a missing unit whose LoadState says so", function()
      local u = assert(m:unit(unit_name("missing")))
      assert.equal("not-found", u:get("LoadState"))
      local ok, err, code = u:start()
      assert.is_nil(ok)
      assert.matches("start of .*missing%.service failed: Unit .* not found", err)
      assert.equal("org.freedesktop.systemd1.NoSuchUnit", code)
    end)

    it("reads the properties a restart plan needs, drop-ins, environment files and reverse deps", function()
      local name = sleeper("props", { "EnvironmentFile=-/nonexistent", "EnvironmentFile=/etc/hostname" })
      local dropin_dir = UNIT_DIR .. "/" .. name .. ".d"
      assert(os.execute("mkdir -p " .. shell_quote(dropin_dir)))
      write_file(dropin_dir .. "/10-spec.conf", "[Service]\nEnvironment=RR_SPEC=1\n")
      -- Active dependents keep the reverse dependencies loaded.
      local needs = sleeper("props-needs", nil, { "Requires=" .. name, "After=" .. name })
      local bound = sleeper("props-bound", nil, { "BindsTo=" .. name, "After=" .. name })
      assert(m:daemon_reload())
      assert(assert(m:unit(needs)):start())
      assert(assert(m:unit(bound)):start())
      local u = assert(m:unit(name))
      local p = assert(u:properties())

      assert.equal("active", p.ActiveState)
      assert.equal("running", p.SubState)
      assert.equal("loaded", p.LoadState)
      assert.equal("success", p.Result)
      assert.equal(UNIT_DIR .. "/" .. name, p.FragmentPath)
      assert.same({ dropin_dir .. "/10-spec.conf" }, p.DropInPaths)
      assert.same({ { path = "/nonexistent", optional = true }, { path = "/etc/hostname", optional = false } },
        p.EnvironmentFiles)
      assert.is_false(p.CanReload)
      assert.is_false(p.NeedDaemonReload)
      assert.is_true(math.type(p.MainPID) == "integer" and p.MainPID > 0)
      assert.equal(0, p.NRestarts)
      assert.is_true(p.ExecMainStartTimestampMonotonic > 0)
      assert.matches("^%x+$", p.InvocationID)
      assert.equal(32, #p.InvocationID)
      assert.same({ needs }, p.RequiredBy)
      assert.same({ bound }, p.BoundBy)
      assert.equal("table", type(p.Environment))
      assert.equal("RR_SPEC=1", p.Environment[1])

      -- Only the named ones, from either interface, the same values; an unknown name is absent.
      local few = assert(u:properties({ "ActiveState", "MainPID", "EnvironmentFiles", "NoSuchProperty" }))
      local keys = {}
      for k in pairs(few) do keys[#keys + 1] = k end
      table.sort(keys)
      assert.same({ "ActiveState", "EnvironmentFiles", "MainPID" }, keys)
      assert.equal(p.MainPID, few.MainPID)
      assert.same(p.EnvironmentFiles, few.EnvironmentFiles)
      assert.has_error(function() u:properties({}) end, "bad argument #1 to 'properties' (empty list)")
      assert.has_error(function() u:properties({ "ActiveState", 42 }) end)

      -- One property, from either interface.
      assert.equal(p.MainPID, u:get("MainPID"))
      assert.equal("active", u:get("ActiveState"))
      local v, err, code = u:get("NoSuchProperty")
      assert.is_nil(v)
      assert.matches("NoSuchProperty", err)
      assert.equal("org.freedesktop.DBus.Error.UnknownProperty", code)
    end)

    it("lists units by pattern", function()
      local name = sleeper("listed")
      local u = load(name)
      assert(u:start())
      local list = assert(m:list_units({ PREFIX .. "listed*" }))
      assert.equal(1, #list)
      assert.equal(name, list[1].name)
      assert.equal("active", list[1].active_state)
      assert.equal("loaded", list[1].load_state)
      assert(u:stop())
    end)

    it("lists units from a task, leaving nothing behind", function()
      -- In a task the wait is a yield, which leaves the C function by a longjmp: the method call
      -- it had built stayed referenced, and kept the connection alive (make check-asan: a leak).
      local name = sleeper("listedtask")
      local u = load(name)
      assert(u:start())
      local ok, list, err = rr.wait(rr.spawn(function() return m:list_units(PREFIX .. "listedtask*") end))
      assert.is_true(ok)
      assert.is_table(list, tostring(err))
      assert.equal(1, #list)
      assert.equal(name, list[1].name)
      assert(u:stop())
    end)
  end)

  describe("jobs", function()
    it("restarts a unit: the main process is new once the call returns", function()
      local u = load(sleeper("restart"))
      assert(u:start())
      local before = u:get("MainPID")
      local ok, result, unit_result = u:restart()
      assert.is_true(ok)
      assert.equal("done", result)
      assert.equal("success", unit_result)
      local after = u:get("MainPID")
      assert.is_true(after > 0)
      assert.are_not.equal(before, after)
      assert.equal("active", u:get("ActiveState"))
    end)

    it("reports a failed start with the unit's Result", function()
      local u = load(write_unit("false", { "Type=oneshot", "ExecStart=/bin/false" }))
      local ok, err, job_result, unit_result = u:restart()
      assert.is_nil(ok)
      assert.equal("failed", job_result)
      assert.equal("exit-code", unit_result)
      assert.matches("^restart of .*false%.service failed: failed %(unit result: exit%-code", err)
      assert.equal("failed", u:get("ActiveState"))
      assert(u:reset_failed())
      assert.equal("inactive", u:get("ActiveState"))
    end)

    it("reports a main program that does not exist", function()
      local u = load(write_unit("noexec", { "Type=exec", "ExecStart=/nonexistent/program" }))
      local ok, err, job_result, unit_result = u:start()
      assert.is_nil(ok)
      assert.equal("failed", job_result)
      assert.equal("exit-code", unit_result)
      assert.matches("exit%-code", err)
    end)

    it("names start-limit-hit when a unit is restarted too often", function()
      local u = load(write_unit("limited", { "ExecStart=/bin/sleep 1000" },
        { "StartLimitIntervalSec=60", "StartLimitBurst=2" }, { start_limit = true }))
      assert(u:start())
      local ok, err, job_result, unit_result
      for _ = 1, 5 do
        ok, err, job_result, unit_result = u:restart()
        if not ok then break end
      end
      assert.is_nil(ok)
      assert.equal("failed", job_result)
      assert.equal("start-limit-hit", unit_result)
      assert.matches("unit result: start%-limit%-hit, start request repeated too quickly", err)
      assert.matches("reset_failed", err)
      -- reset-failed clears the counter.
      assert(u:reset_failed())
      assert.is_true((u:start()))
      assert(u:stop())
    end)

    it("fails a reload of a unit without ExecReload= cleanly", function()
      local u = load(sleeper("noreload"))
      assert(u:start())
      local pid = u:get("MainPID")
      local ok, err, code = u:reload()
      assert.is_nil(ok)
      assert.matches("^reload of .*noreload%.service failed: Job type reload is not applicable", err)
      assert.equal("org.freedesktop.systemd1.JobTypeNotApplicable", code)
      assert.equal(pid, u:get("MainPID"))
      assert.equal("active", u:get("ActiveState"))
    end)

    it("reloads a unit with ExecReload=: the main process stays", function()
      local u = load(reloadable("reload"))
      assert(u:start())
      assert.is_true(u:get("CanReload"))
      local pid = u:get("MainPID")
      assert.is_true(pid > 0)
      local ok, result = u:reload()
      assert.is_true(ok)
      assert.equal("done", result)
      assert.equal(pid, u:get("MainPID"))
      assert.equal("active", u:get("ActiveState"))
    end)

    it("reload_or_restart reloads what can reload and restarts the rest", function()
      local r = load(reloadable("ror-reload"))
      local s = load(sleeper("ror-restart"))
      assert(r:start())
      assert(s:start())
      local rpid, spid = r:get("MainPID"), s:get("MainPID")
      assert.is_true((r:reload_or_restart()))
      assert.is_true((s:reload_or_restart()))
      assert.equal(rpid, r:get("MainPID"))
      assert.are_not.equal(spid, s:get("MainPID"))
    end)

    it("try_restart leaves an inactive unit alone", function()
      local u = load(sleeper("tryrestart"))
      assert.is_true((u:try_restart()))
      assert.equal("inactive", u:get("ActiveState"))
      assert(u:start())
      local pid = u:get("MainPID")
      assert.is_true((u:try_restart()))
      assert.are_not.equal(pid, u:get("MainPID"))
    end)

    it("takes a job mode and a timeout: a start past it returns ETIMEDOUT and the job, wait_job waits for it", function()
      local u = load(sleeper("slowstart", { "ExecStartPre=/bin/sleep 1" }))
      local t0 = rr.now()
      local ok, err, code, job, escalated = u:start("replace", { timeout = 0.2 })
      assert.is_nil(ok)
      assert.equal("ETIMEDOUT", code)
      assert.matches("^/org/freedesktop/systemd1/job/%d+$", job)
      assert.is_nil(escalated)
      assert.equal(("start of %s: not done within 0.2 s; systemd is still running the job %s"):format(
        u:name(), job), err)
      assert.is_true(rr.now() - t0 < 0.9)
      assert.equal("activating", u:get("ActiveState"))
      assert.same({ true, "done", "success" }, { u:wait_job(job) })
      assert.equal("active", u:get("ActiveState"))
      -- opts in place of the mode
      assert.is_true((u:stop{ timeout = 10 }))
    end)

    it("keeps the result of a job that ended before wait_job was called, for one wait", function()
      local u = load(sleeper("keptresult", { "ExecStartPre=/bin/sleep 0.5" }))
      local ok, _, code, job = u:restart{ timeout = 0.1 }
      assert.is_nil(ok)
      assert.equal("ETIMEDOUT", code)
      assert.same({ true, "active" }, { u:wait_state("active", 10) })
      assert.same({ true, "done", "success" }, { u:wait_job(job, { timeout = 10 }) })
      local again, err, again_code = u:wait_job(job)
      assert.is_nil(again)
      assert.equal("ENOENT", again_code)
      assert.matches("job /org/freedesktop/systemd1/job/%d+ is gone: it ended before the wait", err)
      assert(u:stop())
    end)

    it("says a job it does not know is gone", function()
      local u = load(sleeper("nosuchjob"))
      local ok, err, code = u:wait_job("/org/freedesktop/systemd1/job/4000000000")
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
      assert.matches("is gone", err)
    end)

    it("escalates a stop that outlasts its timeout: SIGKILL to the unit's processes, then the stop's real end", function()
      local u = load(slow_stopper("slowstop", 30))
      assert(u:start())
      local pid = u:get("MainPID")
      assert.is_true(pid > 0)
      local t0 = rr.now()
      local ok, result, unit_result, escalated = u:stop{ timeout = 0.5 }
      assert.is_true(ok, tostring(result))
      assert.equal("done", result)
      assert.equal("SIGKILL", escalated)
      -- systemd saw its main process killed by a signal, as after its own stop timeout
      assert.equal("signal", unit_result)
      assert.is_true(rr.now() - t0 < 20, "waited for the fixture's 30 s shutdown")
      assert.equal("failed", u:get("ActiveState"))
      assert.equal(0, u:get("MainPID"))
      assert.is_nil(io.open("/proc/" .. pid .. "/stat"), "the fixture still runs")
      assert(u:reset_failed())
      assert.equal("inactive", u:get("ActiveState"))
    end)

    it("returns ETIMEDOUT, the job and the escalation when a stop outlasts the SIGKILL and the grace", function()
      -- ExecStopPost= runs once the main process died of the SIGKILL: the stop goes on 2 s more.
      local u = load(slow_stopper("slowpost", 30, { "ExecStopPost=/bin/sleep 2" }))
      assert(u:start())
      local ok, err, code, job, escalated = u:stop{ timeout = 0.3, grace = 0.3 }
      assert.is_nil(ok)
      assert.equal("ETIMEDOUT", code)
      assert.matches("^/org/freedesktop/systemd1/job/%d+$", job)
      assert.equal("SIGKILL", escalated)
      assert.equal(("stop of %s: not done within 0.3 s, nor 0.3 s after SIGKILL to every process of the unit; "
        .. "systemd is still running the job %s"):format(u:name(), job), err)
      assert.equal("deactivating", u:get("ActiveState"))
      assert.same({ true, "done", "signal" }, { u:wait_job(job) })
      assert.equal("failed", u:get("ActiveState"))
      assert(u:reset_failed())
    end)

    it("runs 50 restarts from 50 tasks at once", function()
      local names = {}
      for i = 1, 50 do names[i] = sleeper("many" .. i) end
      assert(m:daemon_reload())
      local units, before = {}, {}
      -- Handles made in tasks too (the unit keeps its manager from the task's stack).
      local loads = {}
      for i, name in ipairs(names) do loads[i] = rr.spawn(function() return m:unit(name) end) end
      for i, r in ipairs(rr.wait(loads)) do units[i] = assert(r[2], r[3]) end
      local starts = {}
      for i, u in ipairs(units) do starts[i] = rr.spawn(function() return u:start() end) end
      for _, r in ipairs(rr.wait(starts)) do assert.is_true(r[1] and r[2]) end
      for i, u in ipairs(units) do before[i] = u:get("MainPID") end

      local tasks = {}
      for i, u in ipairs(units) do
        tasks[i] = rr.spawn(function()
          local ok, result = u:restart()
          return ok, result, u:get("MainPID")
        end)
      end
      local results = rr.wait(tasks)
      for i, r in ipairs(results) do
        assert.is_true(r[1]) -- the task did not raise
        assert.is_true(r[2], tostring(r[3]))
        assert.equal("done", r[3])
        assert.are_not.equal(before[i], r[4])
        assert.is_true(r[4] > 0)
      end
      local stops = {}
      for i, u in ipairs(units) do stops[i] = rr.spawn(function() return u:stop() end) end
      rr.wait(stops)
    end)

    it("drops a job wait whose task is canceled; the job goes on", function()
      local u = load(sleeper("cancel", { "ExecStartPre=/bin/sleep 0.5" }))
      local t = rr.spawn(function() return u:start() end)
      -- The job runs (ExecStartPre= sleeps): the task waits for its JobRemoved now.
      assert.same({ true, "activating" }, { u:wait_state("activating", 5) })
      assert.equal("waiting", t:status())
      t:cancel()
      local ok, err = rr.wait(t)
      assert.is_false(ok)
      assert.matches("canceled", err)
      assert.equal("canceled", t:status())
      assert.same({ true, "active" }, { u:wait_state("active", 10) })
      assert(u:stop())
    end)

    it("raises on misuse", function()
      local u = load(sleeper("misuse"))
      assert.has_error(function() u:restart("sideways") end)
      assert.has_error(function() u:restart("replace", { timeout = -1 }) end)
      assert.has_error(function() u:restart("replace", { tiemout = 1 }) end)
      assert.has_error(function() u:stop{ grace = -1 } end)
      assert.has_error(function() u:stop{ grace = "1" } end)
      assert.has_error(function() u:wait_job("/org/freedesktop/systemd1/unit/x") end)
      assert.has_error(function() u:wait_job(42) end)
      assert.has_error(function() u:wait_job() end)
      assert.has_error(function() u:restart(42) end)
      assert.has_error(function() m:unit("no spaces.service") end)
      assert.has_error(function() m:unit("nosuffix") end)
      assert.has_error(function() m:unit(nil) end)
      assert.has_error(function() u:wait_state("running", 1) end)
      assert.has_error(function() u:wait_state({}, 1) end)
      assert.has_error(function() u:wait_change({ "MainPID" }, 1, { MainPID = {} }) end)
      -- an argument whose metamethod raises leaves no wait behind (make check-asan: no leak)
      local boom = setmetatable({}, { __index = function() error("boom") end })
      assert.has_error(function() u:wait_change({ "MainPID" }, 1, boom) end)
      assert.has_error(function() u:kill("NOPE") end)
      assert.has_error(function() u.restart(m) end)
    end)
  end)

  describe("daemon_reload", function()
    it("clears NeedDaemonReload after a unit file edit", function()
      local name = sleeper("edited")
      local u = load(name)
      assert(u:start())
      assert.is_false(u:get("NeedDaemonReload"))
      append_line(UNIT_DIR .. "/" .. name, "Environment=EDITED=1")
      assert.is_true(u:get("NeedDaemonReload"))
      assert.is_true(m:daemon_reload())
      assert.is_false(u:get("NeedDaemonReload"))
      -- Jobs and signals still work after the reload.
      local pid = u:get("MainPID")
      assert.is_true((u:restart()))
      assert.are_not.equal(pid, u:get("MainPID"))
    end)
  end)

  describe("wait_state", function()
    it("wakes on the signal when the unit becomes active", function()
      local u = load(sleeper("waitactive"))
      local t0 = rr.now()
      local waiter = rr.spawn(function() return u:wait_state({ "active" }, 10) end)
      rr.spawn(function()
        rr.sleep(0.05)
        assert(u:start())
      end)
      local ok, res, state = rr.wait(waiter)
      assert.is_true(ok)
      assert.is_true(res)
      assert.equal("active", state)
      assert.is_true(rr.now() - t0 < 5, "woke late")
    end)

    it("returns at once when the unit is already in a state asked for", function()
      local u = load(sleeper("waitnow"))
      assert(u:start())
      assert.same({ true, "active" }, { u:wait_state({ "failed", "active" }, 10) })
      assert.same({ true, "active" }, { u:wait_state("active") })
    end)

    it("wakes when a unit fails", function()
      local u = load(write_unit("waitfail", { "ExecStart=/bin/sh -c 'sleep 0.2; exit 3'" }))
      assert(u:start())
      assert.same({ true, "failed" }, { u:wait_state({ "failed", "inactive" }, 10) })
      assert.equal("exit-code", u:get("Result"))
    end)

    it("times out with the current state", function()
      local u = load(sleeper("waittimeout"))
      assert(u:start())
      local t0 = rr.now()
      local ok, err, code, state = u:wait_state("failed", 0.3)
      local elapsed = rr.now() - t0
      assert.is_nil(ok)
      assert.equal("ETIMEDOUT", code)
      assert.matches("is still active at the timeout", err)
      assert.equal("active", state)
      assert.is_true(elapsed >= 0.29 and elapsed < 3)
    end)

    it("lets its task be canceled", function()
      local u = load(sleeper("waitcancel"))
      local t = rr.spawn(function() return u:wait_state("active", 30) end)
      rr.sleep(0.05)
      t:cancel()
      assert.is_false((rr.wait(t)))
      assert.equal("canceled", t:status())
    end)
  end)

  describe("wait_change", function()
    it("sees the main process die and the unit restart itself (stabilization)", function()
      local u = load(sleeper("flap", { "Restart=always", "RestartSec=0.2" }))
      assert(u:start())
      local since = assert(u:properties())
      assert(u:kill("KILL", "main"))
      local props, changed = u:wait_change({ "ActiveState", "MainPID", "NRestarts" }, 5, since)
      assert.is_table(props, tostring(changed))
      assert.is_true(#changed >= 1)
      assert.are_not.equal(since.MainPID, props.MainPID)
      -- and then the restart counter grows
      props, changed = u:wait_change({ "NRestarts" }, 5, since)
      assert.is_table(props, tostring(changed))
      assert.same({ "NRestarts" }, changed)
      assert.equal(since.NRestarts + 1, props.NRestarts)
      assert.same({ true, "active" }, { u:wait_state("active", 5) })
    end)

    it("returns at once when a property already differs from `since`", function()
      local u = load(sleeper("changed"))
      assert(u:start())
      local props, changed = u:wait_change({ "MainPID", "InvocationID" }, 5,
        { MainPID = 1, InvocationID = u:get("InvocationID") })
      assert.is_table(props)
      assert.same({ "MainPID" }, changed)
      assert.equal(u:get("MainPID"), props.MainPID)
    end)

    it("compares with the values read when the wait began, without `since`", function()
      local u = load(sleeper("restarted"))
      assert(u:start())
      local t = rr.spawn(function() return u:wait_change("MainPID", 10) end)
      rr.spawn(function() rr.sleep(0.05); assert(u:restart()) end)
      local ok, props, changed = rr.wait(t)
      assert.is_true(ok)
      assert.is_table(props)
      assert.same({ "MainPID" }, changed)
    end)

    it("fails for a property the unit does not have", function()
      local u = load(sleeper("typo"))
      local props, err, code = u:wait_change({ "MainPid" }, 5)
      assert.is_nil(props)
      assert.matches("has no property MainPid", err)
      assert.equal("org.freedesktop.DBus.Error.UnknownProperty", code)
    end)

    it("times out when nothing changes", function()
      local u = load(sleeper("stable"))
      assert(u:start())
      local since = assert(u:properties())
      local t0 = rr.now()
      local r = { u:wait_change({ "ActiveState", "MainPID", "NRestarts" }, 0.3, since) }
      assert.is_nil(r[1])
      assert.equal("ETIMEDOUT", r[3])
      assert.matches("no change of the watched properties", r[2])
      assert.is_true(rr.now() - t0 >= 0.29)
    end)
  end)
end)

describe("rr.systemd handles", function()
  it("a unit handle keeps its manager alive (the manager itself may be dropped)", function()
    local u = require("rr.systemd").user():unit("default.target")
    collectgarbage()
    collectgarbage()
    local props = assert(u:properties())
    assert.equal("default.target", props.Id)
  end)
end)
