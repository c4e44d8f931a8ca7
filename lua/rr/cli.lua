-- rr.cli: command-line options of plans.
--
-- A small generic parser (cli.parse) driven by a spec that declares each
-- option, the spec of plans/rolling.lua (cli.rolling_spec) with its
-- cross-field rules (cli.check_rolling), and usage text built from a spec
-- (cli.usage). Errors are one line, for "rrengine: <error>" and exit code 2.
--
-- Spec shape:
--   {
--     usage = "rrengine plans/x.lua [options]",   -- synopsis line
--     summary = "what the plan does",             -- optional, one paragraph
--     examples = { { "command line", "what it does" }, ... },   -- optional
--     options = {
--       { name = "services",        -- long name, used as --services
--         key = "services_file",    -- field in the result (default: name with - as _)
--         type = "string",          -- "boolean" (default), "string" or "number"
--         value = "FILE",           -- what the value is, for usage and errors
--         repeatable = true,        -- may be given again; the result is a list
--         split = ",",              -- with repeatable: each value is also a list
--         default = "services.lua", -- value when absent (booleans: false)
--         short = "h",              -- optional one-letter alias, as -h
--         help = "..." },
--     },
--     exit_codes = { { 0, "meaning" }, ... },     -- optional
--   }
--
-- Decisions: options are never abbreviated (a prefix gets a "did you mean",
-- not a guess: a wrong guess here restarts production services); a value
-- option given twice is an error unless repeatable (no silent last-wins);
-- a boolean given twice is harmless and accepted; a repeatable option absent
-- from the command line is nil, not {} (for --service, nil means "all");
-- no value is empty ("--events ''" is a mistake, not a file name); a word
-- after a value option that looks like an option ("--dry-run", "-h", "-x";
-- not "-" or "-1") is a forgotten value, so a value that starts with "-" is
-- given as --opt=-value.
--
-- Why not Debian's lua-argparse (0.7.1, tried against this spec): pparse()
-- returns errors instead of exiting, and a description and an epilog can
-- hold the examples and the exit codes, but its error texts are its own
-- ("option '--services' requires an argument"; "unknown option '-x'" with a
-- second line "Did you mean '-h'?"), its hint is one deletion away only (none
-- for --dry or --foo), "-force" is read as -f -o -r -c -e, an absent flag is
-- nil (0 when it may repeat), an absent list is {} (here nil means "all
-- services"), a repeated value option silently keeps the last one, and ""
-- passes as a value. Keeping the plans' one-line messages would mean matching
-- its English texts and rewriting them: more code than this parser, and tied
-- to one release's wording.

local suggest = require("rr.suggest")

local cli = {}

local TYPES = { boolean = true, string = true, number = true }

local function takes_value(option)
  return option.type ~= nil and option.type ~= "boolean"
end

-- Checks a spec once per parse; misuse raises at the caller of parse/usage.
local function check_spec(spec, level)
  if type(spec) ~= "table" or type(spec.options) ~= "table" then
    error("rr.cli: spec must be a table with an options list", level + 1)
  end
  local seen = {}
  for i, option in ipairs(spec.options) do
    if type(option) ~= "table" or type(option.name) ~= "string" or not option.name:match("^%w[%w-]*$") then
      error(("rr.cli: spec.options[%d] needs a name like \"dry-run\""):format(i), level + 1)
    end
    if not TYPES[option.type or "boolean"] then
      error(("rr.cli: option --%s has unknown type %q"):format(option.name, tostring(option.type)), level + 1)
    end
    if not takes_value(option) and (option.repeatable or option.split) then
      error(("rr.cli: boolean option --%s cannot be repeatable or split"):format(option.name), level + 1)
    end
    if seen[option.name] or (option.short and seen["-" .. option.short]) then
      error(("rr.cli: option --%s declared twice"):format(option.name), level + 1)
    end
    seen[option.name] = true
    if option.short then seen["-" .. option.short] = true end
  end
end

local function key_of(option)
  return option.key or (option.name:gsub("-", "_"))
end

local function metavar(option)
  return option.value or (option.type == "number" and "N" or "VALUE")
end

-- "unknown option --x", with the closest option as a hint. A candidate
-- qualifies when it starts with what was typed (--dry for --dry-run), when it
-- is within a third of the word of edits, or when it shares the first two
-- letters and is within the word's length of edits (--foo for --force).
-- Prefixes rank first, then fewer edits, then declaration order.
local function unknown(shown, typed, spec)
  local best, best_score
  for index, option in ipairs(spec.options) do
    local name = option.name
    local d = suggest.distance(typed, name)
    local prefix = name:sub(1, #typed) == typed
    if #typed > 0 and (prefix or d <= suggest.max_distance(typed)
        or (name:sub(1, 2) == typed:sub(1, 2) and d <= #typed)) then
      local score = (prefix and 0 or 1e6) + d * 1e3 + index
      if best_score == nil or score < best_score then best, best_score = name, score end
    end
  end
  return ("unknown option %s%s"):format(shown, best and (" (did you mean --%s?)"):format(best) or "")
end

-- A value of `option` as its type, or nil, err.
local function convert(option, text)
  if text == "" then
    return nil, ("option --%s needs a value (%s), got an empty string"):format(option.name, metavar(option))
  end
  if option.type ~= "number" then return text end
  if not (text:match("^[+-]?%d*%.?%d*$") and text:match("%d")) then
    return nil, ("option --%s expects a number, got %q"):format(option.name, text)
  end
  local number = tonumber(text)
  return math.tointeger(number) or number
end

-- Parses argv (a list of strings) against spec. Accepts --opt=value and
-- --opt value; "--" ends the options; everything else is positional.
-- Returns opts = { [key] = value..., args = { positional... } }, or nil, err.
function cli.parse(argv, spec)
  if type(argv) ~= "table" then error("rr.cli.parse: argv must be a list of strings, got " .. type(argv), 2) end
  check_spec(spec, 2)
  for i, a in ipairs(argv) do
    if type(a) ~= "string" then
      error(("rr.cli.parse: argv[%d] must be a string, got %s"):format(i, type(a)), 2)
    end
  end

  local by_name = {}
  local opts, given = { args = {} }, {}
  for _, option in ipairs(spec.options) do
    by_name["--" .. option.name] = option
    if option.short then by_name["-" .. option.short] = option end
    if takes_value(option) then
      opts[key_of(option)] = option.default
    else
      opts[key_of(option)] = option.default or false
    end
  end

  -- Records one value of a value option: true, or nil, err.
  local function take(option, text)
    local value, err = convert(option, text)
    if value == nil then return nil, err end
    local key = key_of(option)
    if not option.repeatable then
      if given[option] then return nil, ("option --%s given more than once"):format(option.name) end
      opts[key] = value
      return true
    end
    local items = { value }
    if option.split then
      items = {}
      for item in (text .. option.split):gmatch("(.-)" .. option.split:gsub("%p", "%%%0")) do
        item = item:match("^%s*(.-)%s*$")
        if item == "" then
          return nil, ("option --%s has an empty %s in %q"):format(option.name, metavar(option), text)
        end
        local converted, err = convert(option, item)
        if converted == nil then return nil, err end
        items[#items + 1] = converted
      end
    end
    -- the default (if any) is replaced, never appended to; a value given twice counts once
    local list = given[option] and opts[key] or {}
    local have = {}
    for _, v in ipairs(list) do have[v] = true end
    for _, item in ipairs(items) do
      if not have[item] then list[#list + 1], have[item] = item, true end
    end
    opts[key] = list
    return true
  end

  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      table.move(argv, i + 1, #argv, #opts.args + 1, opts.args)
      break
    end
    if a:sub(1, 1) ~= "-" or a == "-" then
      opts.args[#opts.args + 1] = a
    else
      local long = a:sub(1, 2) == "--"
      local shown, inline = a, nil
      if long then shown, inline = a:match("^([^=]*)=(.*)$") end
      shown = shown or a
      local option = by_name[shown]
      if option == nil then
        -- "-force" may be --force with a dash missing; "-x" is no typo of a long name
        return nil, unknown(shown, long and shown:sub(3) or #shown > 2 and shown:sub(2) or "", spec)
      end
      if not takes_value(option) then
        if inline ~= nil then return nil, ("option %s takes no value"):format(shown) end
        opts[key_of(option)] = true
      else
        local text = inline
        if text == nil then
          -- "--services --dry-run" is a forgotten value, not a file named "--dry-run".
          text = argv[i + 1]
          if text == nil or (text:match("^%-.") and not tonumber(text)) then
            return nil, ("option %s needs a value (%s)"):format(shown, metavar(option))
          end
          i = i + 1
        end
        local ok, err = take(option, text)
        if not ok then return nil, err end
      end
      given[option] = true
    end
    i = i + 1
  end
  return opts
end

local WIDTH = 78

-- Wraps text at WIDTH columns with `indent` on every line but the first,
-- which starts where the caller's own text ends (a hanging indent).
local function hanging(text, indent)
  local lines, line = {}, indent
  for word in text:gmatch("%S+") do
    if #line > #indent and #line + 1 + #word > WIDTH then
      lines[#lines + 1] = line
      line = indent .. word
    else
      line = (#line > #indent) and (line .. " " .. word) or (line .. word)
    end
  end
  if #line > #indent then lines[#lines + 1] = line end
  return table.concat(lines, "\n"):sub(#indent + 1)
end

-- Usage text for a spec: synopsis, summary, examples first (an operator in an
-- emergency wants the command line to copy), then options, then exit codes.
function cli.usage(spec)
  check_spec(spec, 2)
  local out = { "Usage: " .. (spec.usage or "rrengine PLAN [options]") }
  local function section(title)
    out[#out + 1] = ""
    out[#out + 1] = title
  end
  if spec.summary then section(hanging(spec.summary, "")) end
  if spec.examples and #spec.examples > 0 then
    section("Examples:")
    for _, example in ipairs(spec.examples) do
      out[#out + 1] = "  " .. example[1]
      if example[2] then out[#out + 1] = "      " .. hanging(example[2], "      ") end
    end
  end
  section("Options:")
  local columns, width = {}, 0
  for k, option in ipairs(spec.options) do
    local left = (option.short and ("-" .. option.short .. ", ") or "") .. "--" .. option.name
      .. (takes_value(option) and (" " .. metavar(option)) or "")
    columns[k], width = left, math.max(width, #left)
  end
  for k, option in ipairs(spec.options) do
    local help = (option.help or "") .. (option.repeatable and " (repeatable)" or "")
    if option.default ~= nil and takes_value(option) then
      help = help .. (" (default: %s)"):format(tostring(option.default))
    end
    out[#out + 1] = ("  %-" .. width .. "s  %s"):format(columns[k], hanging(help, (" "):rep(width + 4)))
  end
  if spec.exit_codes and #spec.exit_codes > 0 then
    section("Exit codes:")
    for _, code in ipairs(spec.exit_codes) do
      out[#out + 1] = ("  %-4s %s"):format(tostring(code[1]), hanging(code[2], "       "))
    end
  end
  return table.concat(out, "\n") .. "\n"
end

-- The command line of plans/rolling.lua.
cli.rolling_spec = {
  usage = "rrengine plans/rolling.lua [options]",
  summary = "Restart the platform's services in dependency order: health check, backup, "
    .. "optional deploy and migration, reload or restart, health check, stabilization, "
    .. "and rollback of a service whose new version is not healthy.",
  examples = {
    { "rrengine plans/rolling.lua --dry-run",
      "show the plan (order, reload or restart, deploy, migrations) and change nothing" },
    { "rrengine plans/rolling.lua --service sso.api",
      "restart sso.api only (its dependencies are not restarted)" },
    { "rrengine plans/rolling.lua --service sso.api --deploy --deploy-path /tmp/deploy/sso-api",
      "deploy new code into sso.api's working_dir, migrate, restart; a rollback undoes the deploy" },
    { "rrengine plans/rolling.lua --service sso.redis,sso.api --continue-on-error",
      "restart two services; when one fails, skip only the services that depend on it" },
    { "rrengine plans/rolling.lua --user --services ~/dev/services.lua",
      "use your own user service manager (as systemctl --user)" },
    { "rrengine plans/rolling.lua -H deploy@web1 --user",
      "only the services on web1, through ssh (its own manager, state and lock)" },
    { "rrengine plans/rolling.lua --recover",
      "after rrengine itself was killed (exit 4): bring every service it left half done to all-old or all-new" },
  },
  options = {
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the platform's services file (default: ./services.lua, else /etc/rrengine/services.lua; "
        .. "with --user $XDG_CONFIG_HOME/rrengine/services.lua)" },
    { name = "service", key = "service_names", type = "string", value = "NAME", repeatable = true, split = ",",
      help = "restart only this service; repeat it or give a comma list (default: all, in dependency order)" },
    { name = "dry-run", help = "print the plan and why, after read-only checks; change nothing" },
    { name = "diff",
      help = "with --dry-run: show how each unit's definition differs from its last known good snapshot (unified diff)" },
    { name = "force", help = "skip health checks and stabilization (emergency only)" },
    { name = "deploy", help = "rsync --deploy-path into the service's working_dir before the restart" },
    { name = "deploy-path", type = "string", value = "DIR", help = "the new code to deploy (with --deploy)" },
    { name = "skip-migrations", help = "do not run the services' migrate commands" },
    { name = "user", help = "talk to your user service manager, as systemctl --user" },
    { name = "host", short = "H", type = "string", value = "HOST",
      help = "only the services on HOST (as systemctl -H); a services file without hosts: all of them, on HOST" },
    { name = "ssh-config", key = "ssh_config", type = "string", value = "FILE",
      help = "the ssh config for the hosts (default: $RR_SSH_CONFIG, else ssh's own)" },
    { name = "events", key = "events_file", type = "string", value = "FILE",
      help = "append events (JSON lines) here (default: /var/log/rrengine/events.jsonl, "
        .. "with --user $XDG_STATE_HOME/rrengine/events.jsonl)" },
    { name = "parallel", type = "number", value = "N", default = 1,
      help = "restart up to N services at once (0: no limit), never one before its dependencies; "
        .. "a replica group's max_unavailable always applies too" },
    { name = "continue-on-error",
      help = "when a service fails, go on, skipping only the services that depend on it" },
    { name = "json", help = "print one JSON summary on stdout at the end (progress goes to stderr)" },
    { name = "hooks", key = "hook_files", type = "string", value = "FILE", repeatable = true,
      help = "a hook script for the whole run" },
    { name = "accept-unknown-definition",
      help = "go on when a unit's definition changed on disk (NeedDaemonReload) and no known good "
        .. "snapshot exists, although rollback cannot restore the earlier definition" },
    { name = "journal", help = "also send every event to the systemd journal (SYSLOG_IDENTIFIER=rrengine)" },
    { name = "canary-only",
      help = "roll each replica group's canary members, soak them, and stop there (the state directory "
        .. "records it; --promote rolls the rest later)" },
    { name = "promote", help = "roll the rest of the groups whose canary was held by --canary-only, with its release" },
    { name = "recover",
      help = "resolve a run that was killed: finish each service it left in flight on the new version "
        .. "when it is healthy, else roll it back (definition and code)" },
    { name = "resume", help = "with --recover: then run what the interrupted run had not done" },
    { name = "abandon",
      help = "forget a killed run after a human fixed its services by hand (an event records it)" },
    { name = "help", short = "h", help = "show this help" },
  },
  exit_codes = {
    { 0, "every service succeeded" },
    { 1, "a service failed and was rolled back, or was not touched" },
    { 2, "usage or configuration error: nothing was touched" },
    { 3, "a rollback failed: manual action needed (the output says what)" },
    { 4, "an earlier run was killed mid-way and is not resolved: nothing touched; run --recover (or --abandon)" },
    { 130, "interrupted (Ctrl-C, SIGTERM, SIGHUP): no new service started; the one in flight finished or rolled back" },
  },
}

-- Cross-field rules of plans/rolling.lua, after cli.parse. Whether files and
-- directories exist is the plan's business, later. Returns true or nil, err.
function cli.check_rolling(opts)
  if type(opts) ~= "table" then error("rr.cli.check_rolling: opts must be a table, got " .. type(opts), 2) end
  if opts.help then return true end
  local positional = opts.args and opts.args[1]
  if positional then
    return nil, ("unexpected argument %q (choose services with --service NAME)"):format(positional)
  end
  if opts.deploy and not opts.deploy_path then
    return nil, "--deploy needs --deploy-path DIR (the new code to deploy)"
  end
  if opts.deploy_path and not opts.deploy then
    return nil, "--deploy-path needs --deploy (say it twice: this replaces code)"
  end
  -- One deploy directory goes into one working_dir; without a single --service
  -- it would be copied over every service's code.
  if opts.deploy and (opts.service_names == nil or #opts.service_names == 0) then
    return nil, "--deploy needs --service (the service whose working_dir receives the code, or the "
      .. "replicas of one group)"
  end
  if opts.canary_only and opts.promote then
    return nil, "--canary-only and --promote contradict each other (hold the canary, or roll the rest)"
  end
  if opts.recover and opts.abandon then
    return nil, "--recover and --abandon contradict each other (resolve the killed run, or forget it)"
  end
  if opts.resume and not opts.recover then
    return nil, "--resume goes with --recover (recover the killed run, then go on with its plan)"
  end
  if (opts.recover or opts.abandon) and opts.dry_run then
    return nil, ("--%s acts: it cannot be a --dry-run (the dry run already shows an interrupted run)")
      :format(opts.recover and "recover" or "abandon")
  end
  local parallel = opts.parallel
  if parallel ~= nil and (math.type(parallel) ~= "integer" or parallel < 0) then
    return nil, ("--parallel must be an integer >= 0 (0: no limit), got %s"):format(tostring(parallel))
  end
  return true
end

-- cli.parse with cli.rolling_spec, then cli.check_rolling, then the services file found when
-- --services is absent (cli.find_services): opts, or nil, err (code "ENOSERVICES" when no
-- services file exists: a configuration error, not a mistyped command line).
function cli.parse_rolling(argv)
  local opts, err = cli.parse(argv, cli.rolling_spec)
  if not opts then return nil, err end
  local ok, rule_err = cli.check_rolling(opts)
  if not ok then return nil, rule_err end
  if not opts.help and not opts.services_file then
    local path, ferr, code = cli.find_services(opts.user)
    if not path then return nil, ferr, code end
    opts.services_file = path
  end
  return opts
end

-- The usage text of plans/rolling.lua.
function cli.rolling_usage()
  return cli.usage(cli.rolling_spec)
end

-- The places a services file is looked for when --services is not given, in order: the current
-- directory (a checkout, the demo, a directory kept per platform), then the host's
-- configuration, /etc/rrengine/services.lua, or for the user manager (--user)
-- $XDG_CONFIG_HOME/rrengine/services.lua (~/.config when unset), as systemctl --user reads
-- units from the user's own configuration.
function cli.services_places(user)
  local second = "/etc/rrengine/services.lua"
  if user then
    local base = os.getenv("XDG_CONFIG_HOME")
    -- the XDG rule: a relative value is ignored
    if not base or base:sub(1, 1) ~= "/" then base = (os.getenv("HOME") or "") .. "/.config" end
    second = base .. "/rrengine/services.lua"
  end
  return { "services.lua", second }
end

-- cli.find_services(user) -> path | nil, message, "ENOSERVICES": the first of
-- cli.services_places(user) that exists (a file that exists but cannot be read is found: loading
-- it says why), or a message naming every place looked at.
function cli.find_services(user)
  local places = cli.services_places(user)
  for _, path in ipairs(places) do
    if require("rr.fs").stat(path, true) then return path end
  end
  local shown = {}
  for i, path in ipairs(places) do shown[i] = path:sub(1, 1) == "/" and path or ("./" .. path) end
  return nil, ("no services file: looked for %s (give one with --services FILE)")
    :format(table.concat(shown, " and ")), "ENOSERVICES"
end

-- Prints "rrengine: <msg>" on stderr and exits 2 (usage or configuration error).
local function usage_error(msg)
  io.stderr:write("rrengine: ", msg, "\n")
  os.exit(2)
end

-- The start every plan but rolling.lua shares: parses argv against spec (which
-- must have the services option, key services_file, and may have --user), prints the
-- usage and exits 0 on --help, then loads the services file (--services, else the
-- first of cli.services_places). A bad command line or services
-- file prints "rrengine: <error>" (one line per problem) and exits 2.
-- `extra`, optional: try_help = true ends a command-line error with
-- " (try --help)"; check = function(opts) -> true | nil, err, the plan's own
-- rules, checked after --help and before the services file is loaded.
-- Returns opts, platform (see rr.services.load).
function cli.plan_start(argv, spec, extra)
  extra = extra or {}
  local opts, err = cli.parse(argv, spec)
  if not opts then usage_error(extra.try_help and err .. " (try --help)" or err) end
  if opts.help then io.write(cli.usage(spec)); os.exit(0) end
  if extra.check then
    local ok, check_err = extra.check(opts)
    if not ok then usage_error(check_err) end
  end
  if not opts.services_file then
    local path, ferr = cli.find_services(opts.user)
    if not path then usage_error(ferr) end
    opts.services_file = path
  end
  local platform, errs = require("rr.services").load(opts.services_file)
  if not platform then usage_error(table.concat(errs, "\nrrengine: ")) end
  return opts, platform
end

return cli
