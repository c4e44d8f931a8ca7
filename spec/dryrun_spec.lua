-- The dry run as the operator reads it: order, steps and why, warnings about what systemd
-- will do on its own, definition changes, and what would fail — with nothing changed.
local fs = require("rr.fs")
local proc = require("rr.proc")
local platform = require("spec.support.platform")

local engine = os.getenv("RR_ENGINE") or arg[-1]

local function dry(p, args)
  local argv = { engine, "plans/rolling.lua", "--user", "--services", p.services_file, "--dry-run" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local res, _, _, r = proc.run(argv, { env = { XDG_STATE_HOME = p.xdg_state }, timeout = 60 })
  return res or r
end

describe("dry run", function()
  local p
  setup(function()
    p = platform.new({
      { name = "db", reload = true },
      { name = "api", depends = { "db" }, http = true, reload = true, code = true,
        migrate = { "/bin/true" } },
    })
    -- a unit outside the plan that Requires= db: restarting db restarts it too
    p.extra = p.prefix .. "sidecar.service"
    require("spec.support.units").write(p.extra, { exec = { "/bin/sleep", "1000" },
      extra_unit = { "Requires=" .. p.by_name.db.unit, "After=" .. p.by_name.db.unit } })
    p:start()
    assert(platform.manager():unit(p.extra):start())
    assert.is_true(p:run().success) -- known-good snapshots
  end)
  teardown(function()
    platform.manager():unit(p.extra):stop()
    require("spec.support.units").remove(p.extra)
    p:teardown()
  end)

  it("warns that systemd will restart a unit that Requires= the restarted one", function()
    local res = dry(p)
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("systemd will also restart " .. p.extra:gsub("%-", "%%-") .. " %(Requires=%)", res.stdout)
  end)

  it("says reload and why, the deploy source and target, the migration", function()
    local release = p.dir .. "/release"
    assert(fs.mkdir_p(release, 493))
    local res = dry(p, { "--service", "api", "--deploy", "--deploy-path", release })
    assert.equal(0, res.exit_code, res.stdout .. res.stderr)
    assert.matches("reload: reload configured and the definition is unchanged", res.stdout)
    assert.matches("deploy: rsync %-a " .. release:gsub("%-", "%%-") .. "/ %-> ", res.stdout)
    assert.matches("migrate: /bin/true", res.stdout)
    assert.not_matches("1%. db", res.stdout)
  end)

  it("lists definition changes since the known good, with a unified diff on --diff", function()
    local path = p.by_name.api.unit_path
    local good = fs.read(path)
    assert(fs.write_atomic(path, (good:gsub("%[Service%]", "[Service]\nEnvironment=DRY=1", 1))))
    local res = dry(p, { "--service", "api", "--diff" })
    assert(fs.write_atomic(path, good))
    assert.matches("definition modified: " .. path:gsub("%-", "%%-"), res.stdout)
    assert.matches("\n%s+%-%-%- " .. path:gsub("%p", "%%%0") .. "\t%(known good, run [^)]+%)\n", res.stdout)
    assert.matches("\n%s+%+%+%+ " .. path:gsub("%p", "%%%0") .. "\t%(now%)\n", res.stdout)
    assert.matches("\n%s+%+Environment=DRY=1", res.stdout)
    assert.matches("restart: the unit's definition changed", res.stdout)
    assert.matches("daemon%-reload first", res.stdout)
  end)

  it("refuses a deploy into a service without a working_dir as the run does: exit 2, same message", function()
    local release = p.dir .. "/release"
    assert(fs.mkdir_p(release, 493))
    local args = { "--service", "db", "--deploy", "--deploy-path", release }
    local res = dry(p, args)
    assert.equal(2, res.exit_code, res.stdout .. res.stderr)
    assert.equal("rrengine: --deploy: none of the selected services has a working_dir to deploy into\n", res.stderr)
    assert.equal("", res.stdout)
    local argv = { engine, "plans/rolling.lua", "--user", "--services", p.services_file, "--events", p.events_file }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local _, _, _, run = proc.run(argv, { env = { XDG_STATE_HOME = p.xdg_state }, timeout = 60 })
    assert.equal(2, run.exit_code, run.stdout .. run.stderr)
    assert.equal(res.stderr, run.stderr)
  end)

  it("exits 1 when a service would fail its pre-check", function()
    p:control("api", { status = 500 })
    local res = dry(p, { "--service", "api" })
    p:control("api", nil)
    assert.equal(1, res.exit_code)
    assert.matches("pre%-restart health check would fail", res.stdout)
  end)
end)

describe("dryrun.run when the manager cannot load a unit", function()
  it("counts a problem for that service and goes on with the next", function()
    local dryrun = require("rr.dryrun")
    local p = platform.new({ { name = "db" } })
    p:start()
    local db = assert(require("rr.services").validate(p.services_table, "services")).by_name.db
    -- a template without its instance: past the engine's own name check, refused by LoadUnit
    local bad = { name = "tmpl", unit = "rrtmpl@.service", depends = {}, stabilize = 0,
      health = { kind = "systemd", timeout = 1, retries = 0, interval = 1 } }
    local lines = {}
    local ok, problems = pcall(dryrun.run, { order = { bad, db }, manager = platform.manager(),
      state_root = p.state_root, opts = { user = true }, out = function(line) lines[#lines + 1] = line end })
    p:teardown()
    assert.is_true(ok, problems)
    assert.equal(1, problems)
    local text = table.concat(lines, "\n")
    assert.matches("\n%s+✘ cannot load the unit: cannot load rrtmpl@%.service: Unit name rrtmpl@%.service is "
      .. "missing the instance name%. %(org%.freedesktop%.DBus%.Error%.InvalidArgs%)\n", text)
    assert.matches("\n 2%. db ", text)
    assert.matches("Dry run done: 1 problem%(s%)", text)
  end)
end)

describe("the dry run checks depends against the units' own ordering", function()
  local p
  setup(function()
    p = platform.new({
      { name = "db", http = true },
      { name = "api", http = true, depends = { "db" } },           -- no After= for its dependency
      { name = "web", http = true },                                 -- orders itself after api, undeclared
    })
    -- web's unit wants api and orders itself after it; services.lua does not say so
    require("spec.support.helpers").edit(p.by_name.web.unit_path, "%[Unit%]",
      "[Unit]\nWants=" .. p.by_name.api.unit .. "\nAfter=" .. p.by_name.api.unit)
    p:start()
  end)
  teardown(function() p:teardown() end)

  it("warns where services.lua and the unit files disagree, and still plans the run", function()
    local res = dry(p, {})
    assert.matches("depends on db, but " .. p.by_name.api.unit:gsub("%p", "%%%0") .. " has no After=", res.stdout)
    assert.matches(p.by_name.web.unit:gsub("%p", "%%%0") .. " has Wants= and After=" .. p.by_name.api.unit:gsub("%p", "%%%0")
      .. ", but services.lua does not list api in its depends", res.stdout)
    assert.matches("Schedule %(%-%-parallel 1%)", res.stdout)
    assert.matches("critical path %(2 services one after another%): db %-> api", res.stdout)
  end)
end)
