-- The rolling restart end to end: a real sandboxed systemd user manager, real fixture HTTP
-- services, real rsync, real files. Each `describe` builds its own small platform.
local rr = require("rr")
local fs = require("rr.fs")
local units = require("spec.support.units")
local platform = require("spec.support.platform")

local function count(list, name)
  local n = 0
  for _, v in ipairs(list) do if v == name then n = n + 1 end end
  return n
end

local function index_of(list, name)
  for i, v in ipairs(list) do if v == name then return i end end
end

-- The bytes and modes of every file under dir, as a map (relative path -> "mode:content").
local function tree(dir, prefix, acc)
  acc = acc or {}
  prefix = prefix or ""
  for _, name in ipairs(fs.list(dir) or {}) do
    local path = dir .. "/" .. name
    local st = fs.stat(path)
    if st.type == "dir" then
      tree(path, prefix .. name .. "/", acc)
    else
      acc[prefix .. name] = ("%o:%s"):format(st.mode, fs.read(path) or "?")
    end
  end
  return acc
end

describe("rolling restart", function()
  describe("a platform of four services", function()
    local p
    setup(function()
      p = platform.new({
        { name = "db" },
        { name = "cache" },
        { name = "api", depends = { "db", "cache" }, http = true },
        { name = "worker", depends = { "api" }, http = true },
      })
      p:start()
    end)
    teardown(function() p:teardown() end)

    it("restarts every service in dependency order and each gets a new process", function()
      local before = {}
      for _, n in ipairs({ "db", "cache", "api", "worker" }) do before[n] = p:props(n).MainPID end
      local summary = p:run()
      assert.is_true(summary.success, summary.error)
      assert.equal(0, summary.exit_code)
      assert.same({ "db", "cache", "api", "worker" }, summary.services_succeeded)
      local starts = {}
      for _, ev in ipairs(p:events()) do
        if ev.event == "SERVICE_RESTART_SUCCESS" then starts[#starts + 1] = ev.service end
      end
      assert.same({ "db", "cache", "api", "worker" }, starts)
      for n, pid in pairs(before) do
        assert.are_not.equal(pid, p:props(n).MainPID, n .. " was not restarted")
      end
    end)

    it("restarts only the chosen service", function()
      local before = {}
      for _, n in ipairs({ "db", "cache", "api", "worker" }) do before[n] = p:props(n).MainPID end
      local summary = p:run({ services = { "api" } })
      assert.is_true(summary.success, summary.error)
      assert.same({ "api" }, summary.services_succeeded)
      assert.are_not.equal(before.api, p:props("api").MainPID)
      for _, n in ipairs({ "db", "cache", "worker" }) do
        assert.equal(before[n], p:props(n).MainPID, n .. " should not have been touched")
      end
    end)

    it("runs several at a time with --parallel, never starting a service before its dependencies", function()
      local summary = p:run({ parallel = 2 })
      assert.is_true(summary.success, summary.error)
      local evs = p:events()
      local run = evs[#evs].run
      local seq = {}
      for _, ev in ipairs(evs) do
        if ev.run == run and (ev.event == "SERVICE_RESTART_START" or ev.event == "SERVICE_RESTART_SUCCESS") then
          seq[#seq + 1] = ev.event:sub(17) .. ":" .. ev.service
        end
      end
      assert.is_true(index_of(seq, "SUCCESS:db") < index_of(seq, "START:api"))
      assert.is_true(index_of(seq, "SUCCESS:cache") < index_of(seq, "START:api"))
      assert.is_true(index_of(seq, "SUCCESS:api") < index_of(seq, "START:worker"))
      -- db and cache have no dependency between them: both in flight at once
      assert.is_true(index_of(seq, "START:cache") < index_of(seq, "SUCCESS:db"))
    end)

    it("dry run changes nothing: no job, no file, not even the event log", function()
      local before = {}
      for _, n in ipairs({ "db", "cache", "api", "worker" }) do before[n] = p:props(n).MainPID end
      local unit_before = fs.read(p.by_name.api.unit_path)
      local state_before = tree(p.xdg_state)
      os.remove(p.events_file)
      local res = p:cli({ "--dry-run" })
      assert.equal(0, res.exit_code, res.stderr)
      assert.matches("1%. db", res.stdout)
      assert.matches("4%. worker", res.stdout)
      assert.matches("restart: reload not configured", res.stdout)
      for n, pid in pairs(before) do assert.equal(pid, p:props(n).MainPID) end
      assert.equal(unit_before, fs.read(p.by_name.api.unit_path))
      assert.is_nil(fs.stat(p.events_file))
      assert.same(state_before, tree(p.xdg_state), "the dry run wrote into the state directory")
    end)

    it("the pre-check failure leaves the service and its dependents untouched, exit 1", function()
      p:control("api", { status = 500 })
      local before = {}
      for _, n in ipairs({ "db", "cache", "api", "worker" }) do before[n] = p:props(n).MainPID end
      local summary = p:run({ services = { "api", "worker" } })
      p:control("api", nil)
      assert.equal(1, summary.exit_code)
      assert.same({ "api" }, summary.services_failed)
      assert.same({ "worker" }, summary.services_skipped)
      assert.equal(before.api, p:props("api").MainPID)
      assert.equal(before.worker, p:props("worker").MainPID)
      local ev = p:last_event("HEALTH_CHECK_FAILED", "api")
      assert.equal("pre", ev.phase)
      assert.matches("HTTP 500", ev.error)
    end)

    it("--force skips the health checks: an unhealthy service is restarted anyway", function()
      p:control("api", { status = 500 })
      local before = p:props("api").MainPID
      os.remove(p.events_file)
      local summary = p:run({ services = { "api" }, force = true })
      p:control("api", nil)
      assert.is_true(summary.success, summary.error)
      assert.are_not.equal(before, p:props("api").MainPID)
      assert.equal(0, count(p:event_names("api"), "HEALTH_CHECK_PASSED"))
      assert.equal(0, count(p:event_names("api"), "HEALTH_CHECK_FAILED"))
    end)

    it("writes only whole JSON lines with the documented fields", function()
      local text = assert(fs.read(p.events_file))
      local cjson = require("cjson")
      local n = 0
      for line in text:gmatch("([^\n]*)\n") do
        local ev = cjson.decode(line)
        n = n + 1
        assert.is_string(ev.event)
        assert.is_string(ev.run)
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", ev.ts)
        if ev.event:match("^SERVICE_") then
          assert.is_string(ev.service)
          assert.matches("%.service$", ev.unit)
        end
      end
      assert.is_true(n > 5)
      assert.equal("\n", text:sub(-1))
    end)
  end)

  describe("--continue-on-error", function()
    local p
    setup(function()
      p = platform.new({
        { name = "a", http = true },
        { name = "b", depends = { "a" } },
        { name = "c" },
      })
      p:start()
    end)
    teardown(function() p:teardown() end)

    it("skips only the dependents of the failed service", function()
      p:control("a", { status = 500 })
      local c_before = p:props("c").MainPID
      local summary = p:run({ continue_on_error = true })
      p:control("a", nil)
      assert.equal(1, summary.exit_code)
      assert.same({ "a" }, summary.services_failed)
      assert.same({ "b" }, summary.services_skipped)
      assert.same({ "c" }, summary.services_succeeded)
      assert.are_not.equal(c_before, p:props("c").MainPID)
      assert.matches("depends on a", p:last_event("SERVICE_SKIPPED", "b").reason)
    end)

    it("without it, stops the run after the failure", function()
      p:control("a", { status = 500 })
      local summary = p:run()
      p:control("a", nil)
      assert.same({ "b", "c" }, summary.services_skipped)
      assert.same({}, summary.services_succeeded)
    end)
  end)

  describe("reload or restart", function()
    local p
    setup(function()
      p = platform.new({
        { name = "reloadable", http = true, reload = true },
        { name = "plain", http = true, reload = false },
        { name = "badreload", http = true, reload = true,
          extra_service = { "ExecReload=", "ExecReload=/bin/false" } },
      })
      p:start()
    end)
    teardown(function() p:teardown() end)

    it("reloads when configured and possible: same MainPID", function()
      local pid = p:props("reloadable").MainPID
      local summary = p:run({ services = { "reloadable" } })
      assert.is_true(summary.success, summary.error)
      assert.equal(pid, p:props("reloadable").MainPID)
      assert.equal("reload", p:last_event("SERVICE_RESTART_SUCCESS", "reloadable").method)
    end)

    it("restarts when reload is not configured", function()
      local pid = p:props("plain").MainPID
      assert.is_true(p:run({ services = { "plain" } }).success)
      assert.are_not.equal(pid, p:props("plain").MainPID)
    end)

    it("falls back to restart when the reload job fails", function()
      local pid = p:props("badreload").MainPID
      local summary = p:run({ services = { "badreload" } })
      assert.is_true(summary.success, summary.error)
      assert.are_not.equal(pid, p:props("badreload").MainPID)
      assert.is_truthy(p:last_event("RELOAD_FALLBACK", "badreload"))
    end)
  end)

  describe("deploy, migrations and rollback of code", function()
    local p, deploy_dir
    before_each(function()
      p = platform.new({
        { name = "api", http = true, code = true,
          migrate = { "/bin/sh", "-c", "echo migrated >> migrations.txt" } },
      })
      p:start()
      deploy_dir = p.dir .. "/release"
      assert(fs.mkdir_p(deploy_dir .. "/lib", 493))
      assert(fs.write_atomic(deploy_dir .. "/version", "v2\n"))
      assert(fs.write_atomic(deploy_dir .. "/app.lua", "return 'new code'\n"))
      assert(fs.write_atomic(deploy_dir .. "/lib/util.lua", "return 2\n"))
      assert(fs.write_atomic(deploy_dir .. "/added.lua", "return 'added by the deploy'\n"))
    end)
    after_each(function() p:teardown() end)

    it("deploys the code, runs the migration in working_dir and restarts", function()
      local wd = p.by_name.api.working_dir
      local summary = p:run({ deploy = true, deploy_path = deploy_dir })
      assert.is_true(summary.success, summary.error)
      assert.equal("v2\n", fs.read(wd .. "/version"))
      assert.equal("migrated\n", fs.read(wd .. "/migrations.txt"))
      local res = require("rr.http").get(p.by_name.api.url)
      assert.matches("version=v2", res.body)
    end)

    it("skips the migration with skip_migrations", function()
      local wd = p.by_name.api.working_dir
      local summary = p:run({ deploy = true, deploy_path = deploy_dir, skip_migrations = true })
      assert.is_true(summary.success, summary.error)
      assert.is_nil(fs.stat(wd .. "/migrations.txt"))
      assert.is_truthy(p:last_event("MIGRATION_SKIPPED", "api"))
    end)

    it("rolls back code byte-identical when the new version is unhealthy, keeping the service's own writes", function()
      local wd = p.by_name.api.working_dir
      local before = tree(wd)
      before["service.log"] = nil
      -- The new release is broken: its control file makes /health answer 500.
      assert(fs.write_atomic(deploy_dir .. "/api.control", "status=500\n"))
      p.by_name.api.control = wd .. "/api.control"
      local pid = p:props("api").MainPID
      local summary = p:run({ deploy = true, deploy_path = deploy_dir, skip_migrations = true })
      assert.equal(1, summary.exit_code)
      assert.same({ "api" }, summary.services_rolled_back)
      local after = tree(wd)
      local log_after = after["service.log"]
      after["service.log"] = nil
      assert.same(before, after)
      -- the fixture appends a line to service.log at each start: the run's starts are kept
      local _, starts = log_after:gsub("started", "")
      assert.is_true(starts >= 3, "service.log lost the service's own writes: " .. log_after)
      assert.are_not.equal(pid, p:props("api").MainPID)
      assert.equal("active", p:props("api").ActiveState)
      local names = p:event_names("api")
      assert.is_truthy(index_of(names, "ROLLBACK_START"))
      assert.is_truthy(index_of(names, "DEPLOY_UNDONE"))
      assert.is_truthy(index_of(names, "ROLLBACK_SUCCESS"))
    end)

    it("a failed migration restores the code without a restart", function()
      local wd = p.by_name.api.working_dir
      local before = tree(wd)
      local pid = p:props("api").MainPID
      p.services[1].migrate = { "/bin/sh", "-c", "echo 'migration boom' >&2; exit 3" }
      local summary = p:run({ deploy = true, deploy_path = deploy_dir, services_table = p.services_table,
        services_file = false })
      assert.equal(1, summary.exit_code)
      assert.same(before, tree(wd))
      assert.equal(pid, p:props("api").MainPID)
      local ev = p:last_event("MIGRATION_END", "api")
      assert.equal(3, ev.exit_code)
      local out = p:last_event("MIGRATION_OUTPUT", "api")
      assert.equal("migration boom", out.line)
      assert.equal("stderr", out.stream)
    end)

    it("an rsync failure restarts nothing and leaves the working dir intact", function()
      local wd = p.by_name.api.working_dir
      -- A file in the release where the working dir has a non-empty directory (lib): without
      -- --delete rsync cannot make way for it (exit 23), and its dry run already says so
      -- (spec/deploy_spec.lua has this and the failures a dry run cannot see).
      assert(fs.remove_tree(deploy_dir .. "/lib"))
      assert(fs.write_atomic(deploy_dir .. "/lib", "a file where a directory is\n"))
      local before = tree(wd)
      local pid = p:props("api").MainPID
      local summary = p:run({ deploy = true, deploy_path = deploy_dir })
      assert.is_false(summary.success, "the deploy replaced a non-empty directory with a file")
      assert.equal(1, summary.exit_code)
      assert.same(before, tree(wd))
      assert.equal(pid, p:props("api").MainPID)
      assert.is_truthy(p:last_event("DEPLOY_FAILED", "api"))
    end)
  end)
end)
