-- A release that ships a new environment file: systemd reads EnvironmentFile= only when the
-- service starts, so a reload would keep the old values running while the new file becomes
-- the "known good" one. The reload-or-restart decision is made after the deploy, from the
-- definition as it is then.
local fs = require("rr.fs")
local helpers = require("spec.support.helpers")
local platform = require("spec.support.platform")
local snapshot = require("rr.snapshot")

describe("a deploy that changes an environment file", function()
  local p, wd, release
  setup(function()
    p = platform.new({ { name = "api", http = true, code = true, reload = true } })
    for _, s in ipairs(p.services) do s.reload = true end
    helpers.write(p.services_file, "return " .. platform.serialize(p.services_table) .. "\n")
    wd = p.by_name.api.working_dir
    helpers.write(wd .. "/app.env", "MODE=old\n")
    helpers.edit(p.by_name.api.unit_path, "%[Service%]", "[Service]\nEnvironmentFile=" .. wd .. "/app.env")
    p:start()
    release = p.dir .. "/release"
    helpers.write(release .. "/version", "v2\n")
    helpers.write(release .. "/app.env", "MODE=new\n")
  end)
  teardown(function() p:teardown() end)

  it("restarts the service instead of reloading it, and the environment that ran becomes the known good", function()
    local pid = p:props("api").MainPID
    local res = p:cli({ "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.is_nil(p:last_event("UNIT_RELOAD", "api"), "reloaded: the new environment file never took effect")
    local restart = assert(p:last_event("UNIT_RESTART", "api"))
    assert.matches("definition changed", restart.reason)
    local changed = assert(p:last_event("DEFINITION_CHANGED", "api"))
    assert.matches("app.env", table.concat(changed.changes, " "))
    assert.are_not.equal(pid, p:props("api").MainPID)
    local known = assert(snapshot.known_good(p.state_root, "api"))
    for _, f in ipairs(known.files) do
      if f.path == wd .. "/app.env" then
        assert.equal("MODE=new\n", fs.read(known.dir .. "/" .. f.stored))
      end
    end
  end)
end)
