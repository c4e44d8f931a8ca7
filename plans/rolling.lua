-- rrengine plans/rolling.lua: restart the platform (or chosen services) in dependency order,
-- with health gates and automatic rollback. `--help` for the options.
local cli = require("rr.cli")
local rolling = require("rr.rolling")
local ui = require("rr.ui")

local function die(code, msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(code)
end

local opts, err, code = cli.parse_rolling({ ... })
if not opts then
  -- a missing services file is no mistake on the command line: --help would not help
  die(rolling.EXIT_USAGE, code == "ENOSERVICES" and err or err .. " (try --help)")
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
  canary_only = opts.canary_only, promote = opts.promote, host = opts.host, ssh_config = opts.ssh_config,
}

if opts.dry_run then
  -- the run's own preparation: every check that refuses a run (exit 2) refuses the dry run
  local prep, perr = rolling.prepare(run_opts)
  if not prep then die(rolling.EXIT_USAGE, perr) end
  -- every host of the plan read where it is (its manager, files, state root), no lock taken
  local places = require("rr.places")
  local set, serr = places.open({ hosts = places.hosts(prep.order), user = opts.user, lock = false,
    ssh_config = opts.ssh_config })
  if not set then die(rolling.EXIT_FAILED, serr) end
  local local_place = set.by[false]
  local problems = require("rr.dryrun").run({ order = prep.order, manager = local_place and local_place.manager,
    places = set.by, platform = prep.platform, balancers = prep.balancers,
    bluegreen_balancers = prep.bluegreen_balancers, state_root = rolling.state_root(opts.user), opts = opts,
    out = function(line) io.stdout:write(line, "\n") end })
  set:close()
  os.exit(problems > 0 and rolling.EXIT_FAILED or rolling.EXIT_OK)
end

local summary = rolling.run(run_opts)
if summary.exit_code == rolling.EXIT_USAGE then
  die(rolling.EXIT_USAGE, summary.error)
end
if opts.json then
  -- lua-cjson 2.1 writes an empty table as {}: the lists are written by hand so that an empty
  -- list is [] for jq and friends. Each entry of `services` has all its keys, null when unknown
  -- (a skipped service has no method), in one order.
  local cjson = require("cjson")
  local function value(v)
    if v == nil then return "null" end
    return cjson.encode(v)
  end
  local function service(entry)
    local fields = {}
    for i, k in ipairs({ "name", "outcome", "method", "duration_ms", "error", "warning" }) do
      fields[i] = cjson.encode(k) .. ":" .. value(entry[k])
    end
    return "{" .. table.concat(fields, ",") .. "}"
  end
  local parts = {}
  local keys = {}
  for k in pairs(summary) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = summary[k]
    local text
    if type(v) == "table" then
      local items = {}
      for i, item in ipairs(v) do items[i] = k == "services" and service(item) or cjson.encode(item) end
      text = "[" .. table.concat(items, ",") .. "]"
    else
      text = cjson.encode(v)
    end
    parts[#parts + 1] = cjson.encode(k) .. ":" .. text
  end
  io.stdout:write("{", table.concat(parts, ","), "}\n")
else
  if summary.message then io.stdout:write(summary.message, "\n") end
  for _, entry in ipairs(summary.services or {}) do
    if entry.warning then io.stdout:write(("%s %s, but: %s\n"):format(entry.name, entry.outcome, entry.warning)) end
  end
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
