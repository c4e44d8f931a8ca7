-- Corners of the restart flow: hooks that fail or hang, per-service event hooks, the order of
-- a rollback with a down-migration, --force and the known-good definition, and staleness that
-- an earlier service's daemon-reload hides. Real sandboxed manager, real fixture services.
local rr = require("rr")
local fs = require("rr.fs")
local hooks = require("rr.hooks")
local snapshot = require("rr.snapshot")
local platform = require("spec.support.platform")
local helpers = require("spec.support.helpers")

local edit = helpers.edit

describe("hooks in the flow", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true, hooks = nil } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("an after_restart hook that raises fails the service, which is rolled back", function()
    local hook = helpers.write(p.dir .. "/after.lua", [[
      return { after_restart = function(svc) error("smoke test failed for " .. svc.name) end }]])
    local summary = p:run({ hook_files = { hook } })
    assert.equal(1, summary.exit_code)
    assert.same({ "api" }, summary.services_rolled_back)
    local err = p:last_event("SERVICE_RESTART_FAILED", "api").error
    assert.matches("smoke test failed for api", err)
    assert.not_matches("traceback", err) -- one line for the operator
  end)

  it("a hook that hangs is cancelled after the hook timeout", function()
    local hook = helpers.write(p.dir .. "/hang.lua", [[
      local rr = require("rr")
      return { before_restart = function() rr.sleep(60) end }]])
    local saved = hooks.TIMEOUT
    hooks.TIMEOUT = 0.3
    local t0 = rr.now()
    local summary = p:run({ hook_files = { hook } })
    hooks.TIMEOUT = saved
    assert.equal(1, summary.exit_code)
    assert.is_true(rr.now() - t0 < 10)
    assert.matches("timed out after 0.3s", p:last_event("SERVICE_RESTART_FAILED", "api").error)
  end)

  it("os.exit in a hook ends the engine with that code and leaves the unit running (no half rollback)", function()
    local hook = helpers.write(p.dir .. "/exit.lua", [[
      return { after_restart = function() os.exit(7) end }]])
    local res = p:cli({ "--hooks", hook })
    assert.equal(7, res.exit_code, res.stdout .. res.stderr)
    assert.equal("active", p:props("api").ActiveState)
    -- the run did not finish: the next one says so and --recover finishes what was in flight
    local next_run = p:cli({})
    assert.equal(4, next_run.exit_code, next_run.stdout .. next_run.stderr)
    assert.matches("api: left in phase apply", next_run.stderr)
    local rec = p:cli({ "--recover" })
    assert.equal(1, rec.exit_code, rec.stdout .. rec.stderr)
    assert.equal("active", p:props("api").ActiveState)
  end)

  it("before_plan can veto the whole run before anything is touched", function()
    local hook = helpers.write(p.dir .. "/freeze.lua", [[
      return { before_plan = function(plan) return false, "change freeze until Monday" end }]])
    local pid = p:props("api").MainPID
    local summary = p:run({ hook_files = { hook } })
    assert.equal(1, summary.exit_code)
    assert.matches("change freeze until Monday", summary.error)
    assert.same({ "api" }, summary.services_skipped)
    assert.equal(pid, p:props("api").MainPID)
  end)

  it("a service's own hook script sees that service's events through on_event", function()
    local seen = p.dir .. "/own-events.txt"
    local hook = helpers.write(p.dir .. "/own.lua", ([[
      return { on_event = function(ev)
        local f = io.open(%q, "a"); f:write(ev.event, " ", tostring(ev.service), "\n"); f:close()
      end }]]):format(seen))
    p.services[1].hooks = hook
    local summary = p:run({ services_table = p.services_table, services_file = false })
    p.services[1].hooks = nil
    assert.is_true(summary.success, summary.error)
    local text = assert(fs.read(seen))
    assert.matches("SERVICE_RESTART_START api", text)
    assert.matches("SERVICE_RESTART_SUCCESS api", text)
    assert.not_matches("PLAN_START", text) -- run-wide events are for run-wide hooks
  end)
end)

describe("rollback with a down-migration", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true, code = true,
      migrate = { "/bin/sh", "-c", "echo up >> db.txt" },
      migrate_rollback = { "/bin/sh", "-c", "test -f down.sql && echo down >> db.txt" } } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("runs migrate_rollback while the new code (which ships it) is still in place, then undoes the code", function()
    local release = p.dir .. "/release"
    assert(fs.mkdir_p(release, 493))
    helpers.write(release .. "/down.sql", "-- the new release's down migration\n")
    helpers.write(release .. "/api.control", "status=500\n") -- the new release is broken
    local wd = p.by_name.api.working_dir
    local summary = p:run({ deploy = true, deploy_path = release })
    assert.equal(1, summary.exit_code)
    assert.same({ "api" }, summary.services_rolled_back)
    assert.equal("up\ndown\n", fs.read(wd .. "/db.txt"))
    assert.is_nil(fs.stat(wd .. "/down.sql"), "the deploy was not undone")
    assert.is_nil(fs.stat(p.state_root .. "/deploys/api.inflight"), "the undone deploy is still pointed at")
  end)
end)

describe("the known-good definition", function()
  local p
  before_each(function()
    p = platform.new({ { name = "a", http = true }, { name = "b", http = true } })
    p:start()
  end)
  after_each(function() p:teardown() end)

  it("is not replaced by a --force run (nothing checked that it works)", function()
    assert.is_true(p:run().success)
    local before = assert(snapshot.known_good(p.state_root, "a"))
    edit(p.by_name.a.unit_path, "%[Service%]", "[Service]\nEnvironment=FORCED=1")
    assert.is_true(p:run({ services = { "a" }, force = true }).success)
    local after = assert(snapshot.known_good(p.state_root, "a"))
    assert.equal(before.dir, after.dir)
  end)

  it("an edit systemd had not loaded when the run began stays unknown after an earlier service's daemon-reload", function()
    assert.is_true(p:run({ services = { "a" } }).success) -- a has a known good, b has none
    edit(p.by_name.a.unit_path, "%[Service%]", "[Service]\nEnvironment=A_EDIT=1")
    edit(p.by_name.b.unit_path, "%[Service%]", "[Service]\nEnvironment=B_EDIT=1")
    local pid_b = p:props("b").MainPID
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.same({ "a" }, summary.services_succeeded)
    assert.same({ "b" }, summary.services_failed)
    assert.matches("no known%-good snapshot", p:last_event("SERVICE_RESTART_FAILED", "b").error)
    assert.equal(pid_b, p:props("b").MainPID)
    assert.is_nil(snapshot.known_good(p.state_root, "b"))
  end)
end)
