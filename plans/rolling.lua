-- rrengine plans/rolling.lua: restart the platform (or chosen services) in dependency order,
-- with health gates and automatic rollback. `--help` for the options.
local rr = require("rr")
local cli = require("rr.cli")
local rolling = require("rr.rolling")
local ui = require("rr.ui")
local fs = require("rr.fs")

local function die(code, msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(code)
end

local opts, err = cli.parse_rolling({ ... })
if not opts then
  die(rolling.EXIT_USAGE, err .. " (try --help)")
end
if opts.help then
  io.write(cli.rolling_usage())
  os.exit(0)
end

local view = ui.new({ out = opts.json and io.stderr or io.stdout })
local run_opts = {
  services_file = opts.services_file, services = opts.service_names, force = opts.force,
  deploy = opts.deploy, deploy_path = opts.deploy_path, skip_migrations = opts.skip_migrations,
  user = opts.user, events_file = opts.events_file, parallel = opts.parallel,
  continue_on_error = opts.continue_on_error, hook_files = opts.hook_files,
  accept_unknown_definition = opts.accept_unknown_definition, journal = opts.journal, ui = view,
  recover = opts.recover, resume = opts.resume, abandon = opts.abandon, argv = { ... },
}

if opts.dry_run then
  local dryrun = require("rr.dryrun")
  local services = require("rr.services")
  local dag = require("rr.dag")
  local systemd = require("rr.systemd")
  local platform, errs = services.load(opts.services_file)
  if not platform then die(rolling.EXIT_USAGE, table.concat(errs, "\nrrengine: ")) end
  local order, oerr = dag.order(platform.services, opts.service_names)
  if not order then die(rolling.EXIT_USAGE, oerr) end
  if opts.deploy then
    local st = fs.stat(opts.deploy_path, true)
    if not st or st.type ~= "dir" then die(rolling.EXIT_USAGE, ("deploy path %s is not a directory"):format(opts.deploy_path)) end
  end
  -- the hook scripts the run would load: a broken one is the same exit 2 as in the run
  local hooks = require("rr.hooks")
  for _, path in ipairs(opts.hook_files or {}) do
    local ok, herr = hooks.load(path)
    if not ok then die(rolling.EXIT_USAGE, herr) end
  end
  for _, svc in ipairs(order) do
    if svc.hooks then
      local ok, herr = hooks.load(svc.hooks)
      if not ok then die(rolling.EXIT_USAGE, ("service %q: %s"):format(svc.name, herr)) end
    end
  end
  local manager, merr = (opts.user and systemd.user or systemd.system)()
  if not manager then die(rolling.EXIT_FAILED, merr) end
  local problems = dryrun.run({ order = order, manager = manager, state_root = rolling.state_root(opts.user),
    opts = opts, out = function(line) io.stdout:write(line, "\n") end })
  os.exit(problems > 0 and rolling.EXIT_FAILED or rolling.EXIT_OK)
end

local summary = rolling.run(run_opts)
if summary.exit_code == rolling.EXIT_USAGE then
  die(rolling.EXIT_USAGE, summary.error)
end
if opts.json then
  -- lua-cjson 2.1 writes an empty table as {}: the lists are written by hand so that an empty
  -- list is [] for jq and friends.
  local cjson = require("cjson")
  local parts = {}
  local keys = {}
  for k in pairs(summary) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = summary[k]
    local text
    if type(v) == "table" then
      local items = {}
      for i, item in ipairs(v) do items[i] = cjson.encode(item) end
      text = "[" .. table.concat(items, ",") .. "]"
    else
      text = cjson.encode(v)
    end
    parts[#parts + 1] = cjson.encode(k) .. ":" .. text
  end
  io.stdout:write("{", table.concat(parts, ","), "}\n")
else
  if summary.message then io.stdout:write(summary.message, "\n") end
  if summary.exit_code == rolling.EXIT_UNRESOLVED and summary.error then
    io.stderr:write("rrengine: ", summary.error, "\n")
  elseif summary.error and #summary.services_succeeded + #summary.services_failed == 0 and not summary.interrupted then
    io.stderr:write("rrengine: ", summary.error, "\n")
  end
end
if summary.events_file and not opts.json then
  io.stdout:write(("events: %s (run %s)\n"):format(summary.events_file, summary.run))
end
os.exit(summary.exit_code)
