-- The REPL's helpers (`rrengine -i [--user] [--services FILE]`): an operator in an emergency
-- types short calls. main.c calls repl.start(args) with the arguments after -i; the helpers
-- become globals, and every one goes through the same code as the plans.
--   help(["restart"])        the helpers with an example each, or one in detail
--   status()                 state and health of every service (a killed run first)
--   recover([opts])          resolve a killed run, as plans/rolling.lua --recover
--   health("sso.api")        one service's health check, now
--   restart("sso.api", {deploy_path = "/tmp/deploy/sso-api"})   the full flow, with rollback
--   rollback("sso.api")      back to the known-good definition (and undo the last deploy;
--                            {deploy_record = DIR} names the deploy, {no_code = true} leaves the code);
--                            on a terminal it asks first ({yes = true} does not)
--   events(20)               the last events of the event log, one readable line each
--   journal("sso.api", 50)   the unit's journal lines (without journald: what the manager reports)
--   user(true)               talk to your user manager (also --user, RRENGINE_USER=1)
--   services_file(path)      load another services file (also --services, RRENGINE_SERVICES)
-- Signals: Ctrl-C cancels the running line. restart() hands it to the run, as the plan does: the
-- service in flight finishes (or rolls back) and no other one starts. rollback() always
-- finishes: a restore stopped half-way leaves the service down.
--
-- From main.c, besides start(): repl.complete(before, word_start) gives readline its Tab
-- candidates, and main.c sets repl.ask(prompt) -> line | nil (a question answered at the
-- prompt while the loop runs) before start().
local rr = require("rr")
local cli = require("rr.cli")
local fs = require("rr.fs")
local proc = require("rr.proc")
local systemd = require("rr.systemd")
local services = require("rr.services")
local status = require("rr.status")
local health = require("rr.health")
local rolling = require("rr.rolling")
local rollback = require("rr.rollback")
local suggest = require("rr.suggest")

local repl = {}

repl.spec = {
  usage = "rrengine -i [--user] [--services FILE]",
  summary = "The emergency REPL: a Lua prompt with the services loaded and help(), status(), health(name), "
    .. "restart(name), rollback(name), events(n), journal(name, n). Engine options (-e, --debug) go before -i.",
  options = {
    { name = "user", help = "talk to your user service manager, as systemctl --user (default: RRENGINE_USER=1)" },
    { name = "services", key = "services_file", type = "string", value = "FILE",
      help = "the services file (default: $RRENGINE_SERVICES, else ./services.lua, else "
        .. "/etc/rrengine/services.lua, with --user $XDG_CONFIG_HOME/rrengine/services.lua)" },
  },
}

-- The REPL's settings: the manager to talk to and the services file (repl.start fills them).
-- file is nil when none was given and none was found (missing: the message naming the places);
-- given: the file was named (--services, RRENGINE_SERVICES, services_file()), not looked for.
local env = { user = false, file = "services.lua" }
repl.env = env

local function manager()
  if not env.manager then
    local m, err = (env.user and systemd.user or systemd.system)()
    if not m then error(err, 0) end
    env.manager = m
  end
  return env.manager
end

local function platform()
  if not env.platform then
    if not env.file then error(env.missing or "no services file", 0) end
    local p, errs = services.load(env.file)
    if not p then error(table.concat(errs, "\n"), 0) end
    env.platform = p
  end
  return env.platform
end

-- The service called name, or an error that says so with the closest name, as the command line
-- does (rr.suggest): restart("gatewy") -> unknown service "gatewy" (did you mean "gateway"?).
local function service(name)
  if type(name) ~= "string" then
    error(("a service name (a string) is needed, got %s: e.g. restart(%q)"):format(
      type(name), (platform().services[1] or { name = "api" }).name), 0)
  end
  local p = platform()
  local svc = p.by_name[name]
  if not svc then
    local names = {}
    for i, s in ipairs(p.services) do names[i] = s.name end
    local best = suggest.closest(name, names)
    error(("unknown service %q%s"):format(name, best and (" (did you mean %q?)"):format(best) or ""), 0)
  end
  return svc
end

local function ms_text(ms)
  return ms < 1000 and ("%d ms"):format(ms) or ("%.1f s"):format(ms / 1000)
end

-- A question for the operator, answered on the terminal: main.c's repl.ask when the REPL runs
-- (the loop goes on while it waits), else a plain read.
local function ask(prompt)
  if repl.ask then return repl.ask(prompt) end
  io.stdout:write(prompt)
  io.stdout:flush()
  return io.read("l")
end

local helpers = {}
repl.helpers = helpers

-- help(): what each helper is for, with one example; help("restart") one helper in detail.
-- { name, signature, what, example, details }
local HELP = {
  { "status", "status()", "state and health of every service, all at once (a killed run first)", "status()",
    "One look at each unit (ActiveState, SubState, MainPID) and one health check each, concurrently;\n"
      .. "as plans/status.lua. A service with a host is looked at there (ssh, $RR_SSH_CONFIG), grouped by\n"
      .. "host; a host that cannot be reached says so in its rows. A run that was killed mid-way is shown\n"
      .. "first: recover() resolves it." },
  { "health", "health(name)", "one service's full health check, now", 'health("sso.api")',
    "Returns \"healthy\" or \"unhealthy\" and the detail (the probe's answer, or why it failed).\n"
      .. "A service with a host: its unit is looked at there (ssh); an HTTP probe goes out from here." },
  { "restart", "restart(name[, opts])", "the whole flow of plans/rolling.lua for one service, with rollback",
    'restart("sso.api")',
    "Pre-check, known-good snapshot, deploy, migrations, reload or restart, post-check, stabilization;\n"
      .. "an unhealthy new version is rolled back. A service with a host is restarted there (ssh,\n"
      .. "$RR_SSH_CONFIG), under that host's lock, with its records kept on that host. Options:\n"
      .. "  deploy_path = DIR           deploy that code into the service's working_dir first\n"
      .. "  skip_migrations = true      do not run migrate\n"
      .. "  force = true                skip health checks and stabilization (emergency only)\n"
      .. "  hook_files = {FILE, ...}    run-wide hook scripts\n"
      .. "  accept_unknown_definition = true   go on although the definition changed on disk with no known good\n"
      .. "Ctrl-C: the service in flight finishes or rolls back, as in the plan.\n"
      .. "e.g. restart(\"sso.api\", { deploy_path = \"/tmp/deploy/sso-api\" })" },
  { "rollback", "rollback(name[, opts])", "the known-good definition back, and the last deploy undone",
    'rollback("sso.api")',
    "As plans/rollback.lua: under the run lock, the last known good unit file, drop-ins and\n"
      .. "environment files restored, the deploy undone (an unfinished one, else the last one), then\n"
      .. "daemon-reload, start, health check; a service with a host on that host (ssh, $RR_SSH_CONFIG),\n"
      .. "with the records kept there. On a terminal it asks \"roll back NAME? [y/N]\" first.\n"
      .. "Options:\n"
      .. "  yes = true                  do not ask\n"
      .. "  no_code = true              restore the definition only; leave the code\n"
      .. "  deploy_record = DIR         undo exactly the deploy recorded in DIR\n"
      .. "  force = true                no health check after the start\n"
      .. "e.g. rollback(\"sso.api\", { no_code = true, yes = true })" },
  { "recover", "recover([opts])", "resolve a run that was killed mid-way (as --recover)", "recover()",
    "Each service the killed run left in flight ends all-old or all-new. Options:\n"
      .. "  resume = true               then run what the killed run had not done\n"
      .. "  abandon = true              forget the killed run (after fixing things by hand)" },
  { "events", "events([n[, opts]])", "the last n events (default 20), one readable line each", "events(50)",
    "time (UTC), event, service, then the event's fields (method, duration, error, ...).\n"
      .. "events(20, { raw = true }) prints the JSON lines as they are in the event log." },
  { "journal", "journal(name[, n])", "the unit's last n journal lines (default 50)", 'journal("sso.api", 100)',
    "journalctl -u UNIT. Where there is no journald (or no entries), it says so and shows what the\n"
      .. "service manager reports: state, result, the main process's exit status, the last status text." },
  { "user", "user([on])", "talk to your user manager (true) or the system's (false)", "user(true)" },
  { "services_file", "services_file(path)", "load another services file", 'services_file("/etc/rrengine/services.lua")' },
  { "help", "help([name])", "this list, or one helper in detail", 'help("restart")' },
}

function helpers.help(name)
  if name == nil then
    local lines = { "Helpers (help(\"name\") for one in detail; Tab completes names, fields and service names):" }
    for _, h in ipairs(HELP) do
      lines[#lines + 1] = ("  %-24s %s"):format(h[2], h[3])
      lines[#lines + 1] = ("  %-24s   e.g. %s"):format("", h[4])
    end
    lines[#lines + 1] = "Any Lua works too: rr.* is the scripting API (docs/scripting.md). Ctrl-C cancels the running line;"
    lines[#lines + 1] = "Ctrl-D leaves."
    print(table.concat(lines, "\n"))
    return
  end
  -- help(restart) as well as help("restart")
  if type(name) == "function" then
    for k, fn in pairs(helpers) do if fn == name then name = k end end
  end
  local names = {}
  for i, h in ipairs(HELP) do
    names[i] = h[1]
    if h[1] == name then
      local details = h[5] and (h[5] .. "\n") or ""
      print((("%s: %s\n%s%s"):format(h[2], h[3], details,
        details:find("e.g.", 1, true) and "" or ("e.g. " .. h[4])):gsub("\n$", "")))
      return
    end
  end
  local best = type(name) == "string" and suggest.closest(name, names)
  error(("no helper %s%s; help() lists them"):format(type(name) == "string" and ("%q"):format(name) or tostring(name),
    best and (" (did you mean %q?)"):format(best) or ""), 0)
end

function helpers.user(on)
  env.user = on ~= false
  env.manager = nil
  if not env.given then
    -- a file that was looked for, not named: the other manager's place may hold another one
    env.file, env.missing = cli.find_services(env.user)
    env.platform = nil
  end
  return env.user and "user manager" or "system manager"
end

function helpers.services_file(path)
  env.file, env.given = path, true
  env.platform = nil
  return #platform().services .. " services loaded from " .. path
end

function helpers.status()
  local list = status.expand(platform().services, require("rr.state").root(env.user), { user = env.user })
  local here = status.hosts(list)[1] == false
  local rows, unreachable = status.collect_hosts(list, { manager = here and manager() or nil, user = env.user })
  -- a run that was killed mid-way comes first, here or on a host: its services may be half done
  -- (a host's journal written by an engine elsewhere: whether it runs cannot be told from here)
  local journal = require("rr.journal")
  for _, f in ipairs(status.journals(list, { user = env.user, skip = unreachable })) do
    local mark = ({ dead = "!! ", unknown = "?? ", alive = "== " })[f.look.writer]
    for _, line in ipairs(journal.look_lines(f.look, f.host, f.root)) do print(mark .. line) end
    if f.look.writer == "dead" then
      print("!! recover() resolves it (or recover({ abandon = true }) once fixed by hand)")
    end
  end
  print(status.format(rows))
  for _, line in ipairs(status.held(require("rr.state").root(env.user), { services_file = env.file, user = env.user })) do
    print(line)
  end
end

-- recover([{resume = true} | {abandon = true}]) -> text: as plans/rolling.lua --recover
-- (--resume, --abandon) on the REPL's manager.
function helpers.recover(opts)
  opts = opts or {}
  local s = rolling.run({ recover = not opts.abandon, resume = opts.resume, abandon = opts.abandon,
    user = env.user, services_file = env.file, manager = manager(), ui = require("rr.ui").new({}) })
  local text = s.message or ""
  if s.exit_code ~= 0 then
    text = text .. (text ~= "" and "\n" or "") .. ("exit %d: %s"):format(s.exit_code, tostring(s.error))
  end
  return text
end

function helpers.health(name)
  local svc = service(name)
  local m, err = manager(), nil
  if svc.host then
    -- a connection for this one look ($RR_SSH_CONFIG), closed after it: a host that dropped
    -- since is reconnected next time, not stuck as a lost connection in the REPL
    m, err = systemd.remote(svc.host, { user = env.user, timeout = 10 })
    if not m then return "unhealthy", ("host %s unreachable: %s"):format(svc.host, err) end
  end
  local unit
  unit, err = m:unit(svc.unit)
  local ok, info
  if unit then ok, info = health.check(unit, svc.health) end
  if svc.host then m:close() end
  if not unit then return "unhealthy", err end
  return ok and "healthy" or "unhealthy", ok and info.detail or info
end

-- restart(name[, opts]) -> "ok: NAME restarted (T)" | "failed (exit N): ...". opts: deploy_path,
-- force, skip_migrations, hook_files, accept_unknown_definition (as rr.rolling_restart).
function helpers.restart(name, opts)
  opts = opts or {}
  local svc = service(name)
  opts.services = { svc.name }
  opts.deploy = opts.deploy_path ~= nil
  opts.user = env.user
  opts.services_file = env.file
  -- a service on another host: its host's manager, files, lock and journal (rr.places, ssh
  -- with $RR_SSH_CONFIG); this machine's manager is not needed for it
  opts.manager = not svc.host and manager() or nil
  opts.ui = require("rr.ui").new({})
  local s = rolling.run(opts)
  if s.success then
    return ("ok: %s restarted (%s)"):format(table.concat(s.services_succeeded, ", "), ms_text(s.duration_ms))
  end
  local text = ("failed (exit %d): %s"):format(s.exit_code, tostring(s.error))
  if #s.services_rollback_failed > 0 then
    text = text .. "; ROLLBACK FAILED: " .. table.concat(s.services_rollback_failed, ", ") .. " (manual steps above)"
  elseif #s.services_rolled_back > 0 then
    text = text .. "; rolled back: " .. table.concat(s.services_rolled_back, ", ")
  end
  return text
end

-- rollback(name[, {deploy_record = DIR, no_code = true, force = true, yes = true}]) -> "rolled back:
-- NAME (T)" | "rollback of NAME FAILED: ..." | "rollback of NAME not started: ...". In this process,
-- what plans/rollback.lua does, through the same rr.rollback.run: under the run lock, the known-good
-- definition restored and a deploy undone (the one deploy_record names, else an unfinished one,
-- .inflight, else the last successful one, .last; one already undone is left alone), through
-- flow.rollback, its events logged and shown. On a terminal it asks first (a rollback stops the
-- service and cannot be stopped half-way); piped input, or yes = true, does not ask.
function helpers.rollback(name, opts)
  opts = opts or {}
  local svc = service(name)
  if opts.deploy_record and opts.no_code then
    error("deploy_record and no_code contradict each other (undo that deploy, or leave the code)", 0)
  end
  if not opts.yes and fs.isatty(0) then
    local answer = ask(("roll back %s? [y/N] "):format(svc.name))
    if not (answer and (answer:match("^%s*[yY]%s*$") or answer:match("^%s*[yY][eE][sS]%s*$"))) then
      return ("rollback of %s not started: not confirmed (rollback(%q, { yes = true }) does not ask)")
        :format(svc.name, svc.name)
    end
  end
  local call = ("rollback(%q, {%%s})"):format(svc.name)
  local args = { svc = svc, platform = platform(), user = env.user, manager = not svc.host and manager() or nil,
    deploy_record = opts.deploy_record, no_code = opts.no_code, force = opts.force,
    reason = "manual rollback (REPL)", view = require("rr.ui").new({}),
    spell = { no_code = call:format("no_code = true"), deploy_record = call:format("deploy_record = DIR"),
      named = "deploy_record" } }

  -- A restore stopped half-way leaves the service stopped or with a mixed definition: a
  -- signal is noted, and the rollback goes on to its end.
  local function on_signal(sig)
    io.stderr:write(("rrengine: %s: the rollback of %s goes on to its end\n"):format(sig, svc.name))
  end
  rr.on_signal(on_signal)
  local t0 = rr.now()
  local done, code, msg, why = pcall(rollback.run, args)
  rr.off_signal(on_signal)
  if not done then error(code, 0) end
  if code == 0 then
    return ("rolled back: %s (%s)"):format(svc.name, ms_text(math.floor((rr.now() - t0) * 1000 + 0.5)))
  elseif code == 3 then
    return ("rollback of %s FAILED: %s (manual steps above)"):format(svc.name, tostring(msg))
  elseif why == "ENOTHING" then
    -- the lines above said what about the code; the REPL's words for the outcome are shorter
    msg = "nothing to restore (no known-good snapshot of its definition, no deploy to undo); "
      .. "the service was not touched"
  end
  return ("rollback of %s not started: %s"):format(svc.name, tostring(msg))
end

-- ---- events(n): the event log, readable ----

-- The fields that say most about an event come first, in this order; the rest follow sorted.
local FIRST = { "phase", "method", "result", "action", "exit_code", "duration_ms", "reason", "error",
  "rollback_error", "warning", "note" }
-- Said by the line's own columns (time, event, service) or the same on every line of a run.
local HIDDEN = { ts = true, event = true, run = true, service = true, unit = true }
local MAX_VALUE = 200

local function value_text(k, v)
  local cjson = require("cjson")
  local text
  if k == "duration_ms" and math.type(v) then
    return "took " .. ms_text(math.floor(v))
  elseif type(v) == "string" then
    -- quoted when it has spaces, as a log line is read (and cut) by eye
    text = (v == "" or v:find("[%s\"=]")) and ('"' .. v:gsub('[\\"]', "\\%0"):gsub("\n", "\\n") .. '"') or v
  elseif type(v) == "table" then
    local ok, encoded = pcall(cjson.encode, v)
    text = ok and encoded:gsub("\\/", "/") or tostring(v) -- JSON, without cjson's "\/" for "/"
  elseif type(v) == "number" then
    text = tostring(math.tointeger(v) or v) -- the log's 3 is decoded as 3.0
  elseif v == cjson.null then
    text = "null"
  else
    text = tostring(v)
  end
  if utf8.len(text) and utf8.len(text) > MAX_VALUE then
    text = text:sub(1, (utf8.offset(text, MAX_VALUE) or MAX_VALUE + 1) - 1) .. "…"
  end
  return k .. "=" .. text
end

-- repl.event_line(ev) -> "2026-03-01 12:00:00.123  SERVICE_RESTART_SUCCESS  api  method=restart took 1.2 s"
function repl.event_line(ev)
  local ts = type(ev.ts) == "string" and #ev.ts >= 19 and (ev.ts:sub(1, 10) .. " " .. ev.ts:sub(12, 23)) or tostring(ev.ts)
  local parts, seen = {}, {}
  -- an empty list (no files removed) says nothing
  local function says(v) return v ~= nil and not (type(v) == "table" and next(v) == nil) end
  for _, k in ipairs(FIRST) do
    if says(ev[k]) then parts[#parts + 1], seen[k] = value_text(k, ev[k]), true end
  end
  local rest = {}
  for k, v in pairs(ev) do
    if type(k) == "string" and not seen[k] and not HIDDEN[k] and says(v) then rest[#rest + 1] = k end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do parts[#parts + 1] = value_text(k, ev[k]) end
  return (("%-23s  %-24s %-20s %s"):format(ts, tostring(ev.event), tostring(ev.service or "-"),
    table.concat(parts, " ")):gsub("%s+$", ""))
end

-- The last n lines of a file (at most its last 4 MiB are read).
local function tail_lines(path, n)
  local f = io.open(path, "r")
  if not f then return nil end
  local size = f:seek("end") or 0
  local from = math.max(0, size - 4 * 1024 * 1024)
  f:seek("set", from)
  local text = f:read("a") or ""
  f:close()
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  if from > 0 then table.remove(lines, 1) end -- cut in the middle
  return table.move(lines, math.max(1, #lines - n + 1), #lines, 1, {})
end

-- events([n][, {raw = true}]): the last n (20) events of the event log, one line each.
function helpers.events(n, opts)
  if type(n) == "table" then n, opts = nil, n end
  opts = opts or {}
  local path = rolling.default_events_file(env.user)
  local lines = tail_lines(path, math.max(0, math.floor(tonumber(n) or 20)))
  if not lines then return "no event log at " .. path end
  local cjson = require("cjson")
  for _, line in ipairs(lines) do
    local ok, ev = pcall(cjson.decode, line)
    print((opts.raw or not ok or type(ev) ~= "table") and line or repl.event_line(ev))
  end
end

-- ---- journal(name, n) ----

local SIGNALS = { [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL", [6] = "SIGABRT", [7] = "SIGBUS",
  [8] = "SIGFPE", [9] = "SIGKILL", [11] = "SIGSEGV", [13] = "SIGPIPE", [14] = "SIGALRM", [15] = "SIGTERM" }

-- A realtime timestamp of systemd's (µs since the epoch; 0: never) as UTC text.
local function when(usec)
  if not math.type(usec) or usec <= 0 then return nil end
  return os.date("!%Y-%m-%d %H:%M:%S", usec // 1000000) .. " UTC"
end

-- What the manager knows about a unit's last run, as lines: the bus properties, which every
-- manager has (journald or not).
local function manager_report(unit)
  local p, err = unit:properties()
  if not p then return { "  cannot read its properties: " .. tostring(err) } end
  local lines = {}
  local function line(k, v) if v ~= nil and v ~= "" then lines[#lines + 1] = ("  %-14s %s"):format(k .. ":", v) end end
  local since = when(p.ActiveState == "active" and p.ActiveEnterTimestamp or p.StateChangeTimestamp)
  line("state", ("%s (%s)%s"):format(tostring(p.ActiveState), tostring(p.SubState), since and (" since " .. since) or ""))
  line("result", p.Result)
  local main
  if math.type(p.ExecMainPID) and p.ExecMainPID > 0 then
    local code, st = p.ExecMainCode, p.ExecMainStatus
    local how = code == 1 and ("exited, status=%s"):format(tostring(st))
      or (code == 2 or code == 3) and ("killed by %s%s"):format(SIGNALS[st] or ("signal " .. tostring(st)),
        code == 3 and " (core dumped)" or "")
      or "running"
    local ended = when(p.ExecMainExitTimestamp)
    main = ("pid %d, %s%s"):format(p.ExecMainPID, how, code ~= 0 and ended and (" at " .. ended) or "")
  end
  line("main process", main)
  if math.type(p.NRestarts) and p.NRestarts > 0 then line("restarts", tostring(p.NRestarts)) end
  line("status text", p.StatusText ~= "" and p.StatusText or nil)
  local out = p.StandardOutput
  if type(out) == "string" and (out:match("^file:") or out:match("^append:") or out:match("^truncate:")) then
    line("output", "goes to " .. out:match(":(.*)$"))
  end
  return lines
end

-- journal(name[, n]): the unit's last n (50) journal lines. Where journald is not running, or the
-- journal has nothing for the unit, it says so and shows what the service manager reports instead.
function helpers.journal(name, n)
  local svc = service(name)
  n = math.max(1, math.floor(tonumber(n) or 50))
  local argv = { "journalctl", "--no-pager", "-q", "-n", tostring(n), "-u", svc.unit }
  if env.user then table.insert(argv, 2, "--user") end
  local res, err, _, r = proc.run(argv, { timeout = 10 })
  local out = res or (type(r) == "table" and r) or nil
  local entries = res and res.stdout:gsub("%-%- No entries %-%-\n?", "") or ""
  if entries:match("%S") then
    io.write(entries)
    return
  end
  local why
  if not fs.stat("/run/systemd/journal/socket") then
    why = "no journald here (/run/systemd/journal/socket is absent)"
  elseif not out then
    why = "cannot run journalctl: " .. tostring(err)
  elseif not res then
    why = tostring(err) .. (out.stderr:match("[^\n]+") and (": " .. out.stderr:match("[^\n]+")) or "")
  else
    why = "the journal has no entries for " .. svc.unit
  end
  local lines = { ("journal: %s; what the %s manager reports for %s:"):format(why, env.user and "user" or "system",
    svc.unit) }
  local unit, uerr = manager():unit(svc.unit)
  if not unit then
    lines[#lines + 1] = "  cannot reach the unit: " .. tostring(uerr)
  else
    for _, l in ipairs(manager_report(unit)) do lines[#lines + 1] = l end
  end
  print(table.concat(lines, "\n"))
end

-- ---- Tab completion (main.c's readline calls repl.complete) ----

local KEYWORDS = { "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
  "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while" }

-- Functions whose string argument is a file name: readline's own file name completion.
local FILE_ARGS = { services_file = true, dofile = true, loadfile = true, ["io.open"] = true, ["io.lines"] = true }

-- Where the cursor is in `before` (the line up to it): "code", or "string" with the index of the
-- unfinished string's opening quote, or "comment".
local function context(before)
  local i, n, quote, start = 1, #before, nil, nil
  while i <= n do
    local c = before:sub(i, i)
    if quote then
      if c == "\\" then
        i = i + 1
      elseif c == quote then
        quote = nil
      end
    elseif c == '"' or c == "'" then
      quote, start = c, i
    elseif c == "-" and before:sub(i + 1, i + 1) == "-" then
      return "comment"
    end
    i = i + 1
  end
  if quote then return "string", start end
  return "code"
end

-- The fields of a value that `.` or `:` may name: a table's own string keys and those of its
-- metatable's __index table (for userdata, only that: the methods). No __index function is
-- called: completing must not run anybody's code.
local function fields_of(v, methods_only)
  local out, seen = {}, {}
  local function add(t)
    if type(t) ~= "table" then return end
    for k, x in next, t do
      if type(k) == "string" and k:match("^[%a_][%w_]*$") and not seen[k]
          and (not methods_only or type(x) == "function") then
        seen[k] = true
        out[#out + 1] = { k, x }
      end
    end
  end
  if type(v) == "table" then add(v) end
  local depth, cur = 0, v
  while depth < 4 do
    local mt = (type(cur) == "table" or type(cur) == "userdata") and debug.getmetatable(cur)
    local index = type(mt) == "table" and rawget(mt, "__index")
    if type(index) ~= "table" then break end
    add(index)
    cur, depth = index, depth + 1
  end
  return out
end

-- The value a dotted name (`rr.systemd`) stands for, from the globals, without calling anything.
local function resolve(path)
  local v = _G
  for seg in path:gmatch("[^.]+") do
    if type(v) ~= "table" then return nil end
    local x = rawget(v, seg)
    if x == nil then
      local mt = debug.getmetatable(v)
      local index = type(mt) == "table" and rawget(mt, "__index")
      x = type(index) == "table" and rawget(index, seg) or nil
    end
    v = x
  end
  return v
end

-- Candidates for the text at the cursor, each covering the line from byte `from` (0-based) up
-- to the cursor.
local function candidates(before)
  local where, quote_at = context(before)
  if where == "comment" then return {}, #before end
  if where == "string" then
    local fn = before:sub(1, quote_at - 1):match("([%a_][%w_%.:]*)%s*%(%s*$")
    if fn and FILE_ARGS[fn] then return nil end
    local typed = before:sub(quote_at + 1)
    local names = {}
    if fn == "help" then
      for i, h in ipairs(HELP) do names[i] = h[1] end
    else
      local ok, p = pcall(platform)
      for i, svc in ipairs(ok and p.services or {}) do names[i] = svc.name end
    end
    local out = {}
    for _, name in ipairs(names) do
      if name:sub(1, #typed) == typed then out[#out + 1] = name end
    end
    return out, quote_at
  end
  local token = before:match("[%w_%.:]*$")
  if token:match("^%d") or token:match("^[.:]") then return {}, #before end
  local from = #before - #token
  local base, sep, partial = token:match("^(.-)([.:])([%w_]*)$")
  local out = {}
  local function offer(name, v, prefix)
    if name:sub(1, #partial) == partial then
      out[#out + 1] = prefix .. name .. (type(v) == "function" and "(" or "")
    end
  end
  if not base then
    partial = token
    for _, kv in ipairs(fields_of(_G)) do offer(kv[1], kv[2], "") end
    for _, kw in ipairs(KEYWORDS) do offer(kw, nil, "") end
  elseif base:match("^[%a_][%w_]*[%w_.]*$") and not base:match("%.%.") and not base:match("%.$") then
    local v = resolve(base)
    for _, kv in ipairs(fields_of(v, sep == ":")) do offer(kv[1], kv[2], base .. sep) end
  end
  table.sort(out)
  return out, from
end

-- repl.complete(before, word_start) -> { replacement, ... } | nil: what Tab may put in place of
-- the text from byte word_start (0-based, where readline's word starts) to the cursor; `before`
-- is the line up to the cursor. nil: readline's own file name completion (a services_file("...")
-- argument). Globals and keywords; fields after `.` and methods after `:` (`rr.sp`,
-- `rr.systemd.user():` no: only names, nothing is called); service names inside a string
-- (`restart("sso.`). A function's name comes with its "(".
function repl.complete(before, word_start)
  local list, from = candidates(before)
  if list == nil then return nil end
  local out = {}
  for _, c in ipairs(list) do
    if word_start <= from then
      out[#out + 1] = before:sub(word_start + 1, from) .. c
    elseif c:sub(1, word_start - from) == before:sub(from + 1, word_start) then
      out[#out + 1] = c:sub(word_start - from + 1)
    end
  end
  return out
end

local function usage_error(msg)
  io.stderr:write("rrengine -i: ", msg, " (see rrengine --help)\n")
  os.exit(2)
end

-- repl.start(args): the REPL's options (the arguments after -i), the helpers as globals, the
-- services file loaded. A usage error exits 2 before the prompt. (`rrengine -i --help` is the
-- engine's --help, which lists these options.)
function repl.start(args)
  local opts, err = cli.parse(args or {}, repl.spec)
  if not opts then usage_error(err) end
  if opts.args[1] then
    usage_error(("unexpected argument %q (engine options and the script go before -i)"):format(opts.args[1]))
  end
  env.user = opts.user or os.getenv("RRENGINE_USER") == "1"
  env.file = opts.services_file or os.getenv("RRENGINE_SERVICES")
  env.given, env.missing = env.file ~= nil, nil
  if not env.file then env.file, env.missing = cli.find_services(env.user) end
  env.manager, env.platform = nil, nil
  for name, fn in pairs(helpers) do _G[name] = fn end
  _G.rr = rr

  if env.file and fs.stat(env.file) then
    local ok, perr = pcall(platform)
    print(ok and ("rrengine REPL: %d services from %s (%s manager). Try status(), health(name), restart(name), "
      .. "rollback(name), events(), journal(name); help() lists them all, Tab completes.")
      :format(#env.platform.services, env.file, env.user and "user" or "system") or ("rrengine REPL: " .. perr))
  else
    print(("rrengine REPL: %s; services_file(path) loads one. help() lists the helpers.")
      :format(env.missing or ("no " .. env.file .. " here")))
  end
end

return repl
