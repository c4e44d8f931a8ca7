-- spec/support/platform.lua: a small real platform in the sandboxed user manager, for the
-- rolling-restart specs: fixture services as units, their working dirs, a services table.
--
--   local platform = require("spec.support.platform")
--   local p = platform.new({
--     { name = "db",  health = "systemd" },
--     { name = "api", depends = { "db" }, http = true, code = true, reload = true },
--   })
--   p:start()                          -- daemon-reload, start every unit, wait for active
--   local summary = p:run({ services = { "api" } })   -- rr.rolling_restart in this process
--   local res = p:cli({ "--service", "api" })          -- or plans/rolling.lua, as an operator runs it
--   local ev = p:last_event("SERVICE_SKIPPED", "api")
--   p:teardown()
--
-- Replica groups: a def may name its `group` (and `balancer_server`); opts.groups is the
-- services file's `groups` table. A group's balancer often needs what exists only once the
-- platform does (the replicas' ports for HAProxy's configuration, then HAProxy's socket):
-- p:write_services({ groups = ... }) rewrites the services file with other top-level fields.
--
-- Each service gets a unique unit name (prefix per platform), a port, a control file, and,
-- with code = true, a working dir holding `version` (served in /health's body) and a
-- service-written log (`service.log`, appended by the fixture at start).
local rr = require("rr")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")

local platform = {}
platform.__index = platform

local counter = 0

local write = helpers.write

-- The manager of the sandbox (one connection per process is enough).
local manager
function platform.manager()
  if not manager then
    manager = assert(systemd.user())
  end
  return manager
end

-- defs: list of { name, depends, health = "systemd" | nil, http = bool, code = bool,
--   reload = bool, migrate = argv, migrate_rollback = argv, migrate_timeout = s, deploy_timeout = s,
--   stabilize = s, fixture = {opts},
--   env_file = bool, type = "notify"|nil, health_opts = {timeout=, retries=, interval=},
--   group = NAME, balancer_server = NAME }
-- opts: groups = { [NAME] = { max_unavailable =, balancer =, drain_timeout = } }.
function platform.new(defs, opts)
  opts = opts or {}
  counter = counter + 1
  local self = setmetatable({ defs = defs, services = {}, by_name = {} }, platform)
  self.dir = assert(fs.mkdtemp("/tmp/rr-platform-"))
  self.prefix = ("rrt%d-%d-"):format(fs.getpid and fs.getpid() or 0, counter)
  -- what `--user` runs of the CLI use with XDG_STATE_HOME=self.xdg_state
  self.xdg_state = self.dir .. "/xdg"
  self.state_root = self.xdg_state .. "/rrengine"
  self.events_file = self.dir .. "/events.jsonl"
  for _, d in ipairs(defs) do
    local s = { name = d.name, unit = self.prefix .. d.name:gsub("[^%w]", "-") .. ".service",
      port = units.free_port(), control = self.dir .. "/" .. d.name .. ".control" }
    s.url = ("http://127.0.0.1:%d/health"):format(s.port)
    local fixture = { control_file = s.control }
    for k, v in pairs(d.fixture or {}) do fixture[k] = v end
    if d.code then
      s.working_dir = self.dir .. "/code/" .. d.name
      assert(fs.mkdir_p(s.working_dir, 493))
      write(s.working_dir .. "/version", "v1\n")
      write(s.working_dir .. "/app.lua", "return 'old code'\n")
      assert(fs.mkdir_p(s.working_dir .. "/lib", 493))
      write(s.working_dir .. "/lib/util.lua", "return 1\n")
      fixture.version_file = s.working_dir .. "/version"
      -- the control file lives in the code: a release can ship one and break itself
      s.control = s.working_dir .. "/" .. d.name .. ".control"
      fixture.control_file = s.control
      fixture.write_file = s.working_dir .. "/service.log"
    end
    if d.env_file then
      s.env_file = self.dir .. "/" .. d.name .. ".env"
      write(s.env_file, "MODE=good\n")
    end
    s.unit_path = units.fixture_unit(s.unit, s.port, {
      type = d.type, reload = d.reload ~= false, env_file = s.env_file, log = false,
      extra_unit = d.extra_unit, extra_service = d.extra_service,
      status = fixture.status, warmup = fixture.warmup, hang = fixture.hang, exit_after = fixture.exit_after,
      version_file = fixture.version_file, write_file = fixture.write_file, control_file = fixture.control_file,
      listen_delay = fixture.listen_delay, delay_ms = fixture.delay_ms,
    })
    local entry = { name = d.name, unit = s.unit, depends = d.depends, reload = d.reload,
      working_dir = s.working_dir, migrate = d.migrate, migrate_rollback = d.migrate_rollback,
      migrate_timeout = d.migrate_timeout, deploy_timeout = d.deploy_timeout,
      stabilize = d.stabilize or 0, hooks = d.hooks, deploy_delete = d.deploy_delete, group = d.group,
      balancer_server = d.balancer_server }
    if d.http then
      entry.health = { url = s.url, timeout = 5, retries = 1, interval = 0.2 }
      for k, v in pairs(d.health_opts or {}) do entry.health[k] = v end
    else
      entry.health = d.health or "systemd"
    end
    self.services[#self.services + 1] = entry
    self.by_name[d.name] = s
  end
  self.services_table = { defaults = { health = { timeout = 5, retries = 1, interval = 0.2 }, stabilize = 0 },
    services = self.services, groups = opts.groups }
  self.services_file = self.dir .. "/services.lua"
  self:write_services()
  return self
end

-- Writes the services file (path: default this platform's own) from the platform's table with
-- the top-level fields of `overrides` in place of its own (`groups = false` removes them).
-- Returns the path.
function platform:write_services(overrides, path)
  local tbl = {}
  for k, v in pairs(self.services_table) do tbl[k] = v end
  for k, v in pairs(overrides or {}) do
    if v == false then tbl[k] = nil else tbl[k] = v end
  end
  path = path or self.services_file
  write(path, "return " .. platform.serialize(tbl) .. "\n")
  return path
end

-- The MainPID of each service, by name.
function platform:pids()
  local pids = {}
  for name in pairs(self.by_name) do pids[name] = assert(self:unit(name):get("MainPID")) end
  return pids
end

-- A Lua literal for a plain table of strings, numbers, booleans and tables.
function platform.serialize(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "string" then return ("%q"):format(v) end
  if t ~= "table" then return tostring(v) end
  local parts, inner = {}, indent .. "  "
  local n = #v
  for i = 1, n do parts[#parts + 1] = inner .. platform.serialize(v[i], inner) end
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    -- a key that is not a Lua name ("sso.api") is written ["sso.api"]
    local key = (type(k) == "string" and k:match("^[%a_][%w_]*$")) and k or ("[%s]"):format(platform.serialize(k))
    parts[#parts + 1] = ("%s%s = %s"):format(inner, key, platform.serialize(v[k], inner))
  end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

function platform:unit(name)
  return platform.manager():unit(self.by_name[name].unit)
end

function platform:props(name)
  return assert(self:unit(name):properties())
end

-- daemon-reload, start every unit (in parallel) and wait until each is active and healthy.
function platform:start()
  assert(platform.manager():daemon_reload())
  local tasks = {}
  for _, d in ipairs(self.defs) do
    tasks[#tasks + 1] = rr.spawn(function()
      local u = self:unit(d.name)
      assert(u:start("replace"))
      assert(u:wait_state({ "active" }, 10))
      if d.http then
        -- the engine's own health check: fast probes while it starts, fails if the unit exits
        local ok, why = require("rr.health").check(u, { kind = "http", url = self.by_name[d.name].url,
          timeout = 10, retries = 3, interval = 0.2 })
        assert(ok, ("fixture %s never became healthy: %s"):format(d.name, tostring(why)))
      end
      return true
    end)
  end
  for _, r in ipairs(rr.wait(tasks)) do
    assert(r[1], r[2])
  end
end

-- rr.rolling_restart on this platform, quiet, with its own state root and event log.
function platform:run(opts)
  local o = { services_file = self.services_file, user = true, state_root = self.state_root,
    events_file = self.events_file, manager = platform.manager() }
  for k, v in pairs(opts or {}) do o[k] = v end
  return rr.rolling_restart(o)
end

-- The events of the log, decoded.
function platform:events()
  local cjson = require("cjson")
  local list = {}
  local text = fs.read(self.events_file)
  if not text then return list end
  for line in text:gmatch("[^\n]+") do
    list[#list + 1] = cjson.decode(line)
  end
  return list
end

-- The latest event of the log with this name (and service, when given), or nil: earlier runs
-- of the same platform come first.
function platform:last_event(name, service)
  local found
  for _, ev in ipairs(self:events()) do
    if ev.event == name and (not service or ev.service == service) then found = ev end
  end
  return found
end

-- Runs a plan (opts.plan, default plans/rolling.lua) through the real command line, as an
-- operator does: the engine binary, --user, this platform's services file (or
-- opts.services_file) and event log, its XDG_STATE_HOME, then args. Returns the result
-- (exit_code, stdout, stderr) whatever the exit code. opts: on_line(stream, line);
-- spawned(handle), called once the process runs (to signal it); timeout (default 120 s).
function platform:cli(args, opts)
  opts = opts or {}
  local argv = { helpers.engine, opts.plan or "plans/rolling.lua", "--user",
    "--services", opts.services_file or self.services_file, "--events", self.events_file }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local handle = assert(proc.spawn(argv, { env = { XDG_STATE_HOME = self.xdg_state }, on_line = opts.on_line,
    timeout = opts.timeout or 120 }))
  if opts.spawned then opts.spawned(handle) end
  local res, _, _, r = handle:wait()
  return res or r
end

-- Names of the events for a service, in order.
function platform:event_names(service)
  local names = {}
  for _, ev in ipairs(self:events()) do
    if not service or ev.service == service then names[#names + 1] = ev.event end
  end
  return names
end

function platform:control(name, settings)
  units.control(self.by_name[name].control, settings)
end

function platform:teardown()
  local m = platform.manager()
  for _, s in pairs(self.by_name) do
    local u = m:unit(s.unit)
    u:stop("replace")
    units.remove(s.unit)
  end
  m:daemon_reload()
  fs.remove_tree(self.dir)
end

return platform
