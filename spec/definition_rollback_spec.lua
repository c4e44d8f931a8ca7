-- Rollback to the last known good definition (issue 7): the operator edits the unit (or a
-- drop-in, or its EnvironmentFile) before the run; the new definition fails; rollback brings
-- back the files that last worked, byte-identical, and the service is healthy again. (The broken
-- command is /bin/false: it passes systemd-analyze verify, and fails when the unit starts.)
local fs = require("rr.fs")
local units = require("spec.support.units")
local platform = require("spec.support.platform")

local edit = require("spec.support.helpers").edit

describe("rollback to the last known good definition", function()
  local p
  before_each(function()
    p = platform.new({ { name = "api", http = true, reload = true, env_file = true } })
    p:start()
    -- a first successful run makes the current definition known good
    local summary = p:run()
    assert.is_true(summary.success, summary.error)
    assert.is_truthy(p:last_event("SNAPSHOT_KNOWN_GOOD", "api"))
  end)
  after_each(function() p:teardown() end)

  it("restores a unit file whose ExecStart was broken before the run, byte-identical", function()
    local path = p.by_name.api.unit_path
    local good = fs.read(path)
    edit(path, "ExecStart=%S+", "ExecStart=/bin/false")
    assert.is_true(p:props("api").NeedDaemonReload)
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.same({ "api" }, summary.services_rolled_back)
    assert.equal(good, fs.read(path))
    local props = p:props("api")
    assert.equal("active", props.ActiveState)
    assert.is_false(props.NeedDaemonReload)
    assert.equal(200, require("rr.http").get(p.by_name.api.url).status)
    local restored = p:last_event("DEFINITION_RESTORED", "api")
    assert.same({ path }, restored.restored)
  end)

  it("removes a drop-in added and daemon-reloaded by hand", function()
    local dropin = units.dropin(p.by_name.api.unit, "broken", {
      Service = { "ExecStart=", "ExecStart=/bin/false" } })
    assert(platform.manager():daemon_reload())
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.is_nil(fs.stat(dropin), "the drop-in added since the last good run is still there")
    assert.equal("active", p:props("api").ActiveState)
    assert.same({}, p:props("api").DropInPaths)
  end)

  it("applies a drop-in written into a new .d directory without daemon-reload (systemd does not flag it)", function()
    local pid = p:props("api").MainPID
    units.dropin(p.by_name.api.unit, "flag", { Service = { "Environment=NEW_DROPIN=1" } })
    assert.is_false(p:props("api").NeedDaemonReload) -- what makes this case easy to miss
    local summary = p:run()
    assert.is_true(summary.success, summary.error)
    assert.equal("restart", p:last_event("SERVICE_RESTART_SUCCESS", "api").method)
    assert.are_not.equal(pid, p:props("api").MainPID)
    local env = table.concat(p:props("api").Environment or {}, " ")
    assert.matches("NEW_DROPIN=1", env)
  end)

  it("rolls back a broken drop-in in a new .d directory that was never daemon-reloaded", function()
    local dropin = units.dropin(p.by_name.api.unit, "broken", {
      Service = { "ExecStart=", "ExecStart=/bin/false" } })
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.same({ "api" }, summary.services_rolled_back)
    assert.is_nil(fs.stat(dropin))
    assert.equal("active", p:props("api").ActiveState)
  end)

  it("brings back a changed EnvironmentFile", function()
    local env = p.by_name.api.env_file
    local good = fs.read(env)
    -- the fixture's unit passes $MODE nowhere, so make the new environment break the start:
    -- a drop-in reads the variable and exits when it is not "good"
    units.dropin(p.by_name.api.unit, "mode", { Service = { "ExecStartPre=/bin/sh -c 'test \"$MODE\" = good'" } })
    assert(platform.manager():daemon_reload())
    assert.is_true(p:run().success) -- known good now includes the drop-in
    assert(fs.write_atomic(env, "MODE=broken\n"))
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.equal(good, fs.read(env))
    assert.equal("active", p:props("api").ActiveState)
  end)

  it("restarts (never reloads) when the definition changed, even with reload = true", function()
    local pid = p:props("api").MainPID
    edit(p.by_name.api.unit_path, "%[Service%]", "[Service]\nEnvironment=NEW_FLAG=1")
    local summary = p:run()
    assert.is_true(summary.success, summary.error)
    assert.are_not.equal(pid, p:props("api").MainPID)
    assert.equal("restart", p:last_event("SERVICE_RESTART_SUCCESS", "api").method)
  end)

  it("plans/rollback.lua restores the known-good definition by hand", function()
    local path = p.by_name.api.unit_path
    local good = fs.read(path)
    edit(path, "%[Service%]", "[Service]\nEnvironment=HAND_EDIT=1")
    local res = p:cli({ "--service", "api" }, { plan = "plans/rollback.lua", timeout = 60 })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.equal(good, fs.read(path))
    assert.equal("active", p:props("api").ActiveState)
  end)
end)

describe("first run with a changed unit file and no known-good snapshot", function()
  local p
  setup(function()
    p = platform.new({ { name = "api", http = true } })
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("is refused with the reason, touching nothing", function()
    local path = p.by_name.api.unit_path
    fs.write_atomic(path, (fs.read(path):gsub("%[Service%]", "[Service]\nEnvironment=X=1", 1)))
    local edited = fs.read(path)
    local pid = p:props("api").MainPID
    local summary = p:run()
    assert.equal(1, summary.exit_code)
    assert.matches("no known%-good snapshot", summary.error)
    assert.matches("%-%-accept%-unknown%-definition", summary.error)
    assert.equal(pid, p:props("api").MainPID)
    assert.equal(edited, fs.read(path))
    assert.is_true(p:props("api").NeedDaemonReload)
  end)

  it("goes on with accept_unknown_definition", function()
    local pid = p:props("api").MainPID
    local summary = p:run({ accept_unknown_definition = true })
    assert.is_true(summary.success, summary.error)
    assert.are_not.equal(pid, p:props("api").MainPID)
  end)
end)
