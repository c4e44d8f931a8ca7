-- rr.services: load and validate a platform's services file.
--
-- The file is data: a Lua chunk returning { defaults = ..., services = ... }
-- (the README's "services.lua"). Loading checks everything before anything is
-- touched and reports every problem at once, one line each, naming the file,
-- the service and the field, so that an operator fixes the file in one pass.
--
-- Decisions the README leaves open (documented here, asserted in
-- spec/unit/services_spec.lua):
--   * `health` absent means "systemd": every unit has a systemd state to check.
--   * `health` as a table means an HTTP check and needs `url`.
--   * `expect_body` is a plain substring, not a Lua pattern: health bodies are
--     JSON full of pattern magic characters ("-", ".", "%") and a plain match
--     cannot surprise anyone.
--   * `migrate` / `migrate_rollback` need `working_dir` (they run there).
--   * `migrate_timeout` and `deploy_timeout` are accepted without `migrate` or
--     `working_dir` (a defaults value applies to every service; a lone one is
--     harmless): they only bound commands that run.
--   * A name is letters, digits and . _ : @ - (starting with a letter or
--     digit): names are given on the command line, in comma lists.
--   * Two services naming the same unit is an error (two snapshots and two
--     rollbacks of one unit would fight).
--   * `hooks` is resolved against the services file's directory here; whether
--     the file exists is checked at run time, not by validation.
--   * Groups (`groups`, a member's `group`): a group without members, a budget that
--     resolves to 0 members ("10%" of 3) and members that depend on each other are
--     errors, not warnings: each would leave a roll that can never proceed, or one
--     that serializes what the operator declared as replicas. A member's balancer
--     server name defaults to its service name and must be an HAProxy name when the
--     balancer is HAProxy (a service name may hold "@", which HAProxy refuses).
--     A balancer script and a canary's analysis resolve like `hooks`.
--   * `host` (per service, or top-level for every service without one) is an ssh
--     destination: [USER@]NAME or [USER@][V6]; the brackets are dropped (ssh takes
--     "[::1]" for a name). `host = false` on a service keeps it on this machine
--     despite a top-level `host`. svc.host is nil for this machine.
--   * Every number has a range (NUMBER_RULES below), so that whatever validation
--     accepts, the primitives that receive it (rr.systemd job and wait timeouts,
--     rr.http's timeout <= 86400 s, rr.proc's timeout, rr.sleep) accept too, and
--     a typo (1e-9, 1e9, -1, nan) is reported before anything is touched
--     rather than failing a step, or its rollback, at run time.

local dag = require("rr.dag")
local suggest = require("rr.suggest")

local services = {}

-- Built-in defaults: used when the file's `defaults` omits them.
local BUILTIN_DEFAULTS = {
  health = { timeout = 30, retries = 3, interval = 1 },
  stabilize = 30,
}

-- Fields in the order they are checked and reported.
local SERVICE_FIELDS = {
  "name", "unit", "kind", "depends", "health", "stabilize", "working_dir",
  "migrate", "migrate_rollback", "reload", "hooks", "deploy_delete",
  "start_timeout", "stop_timeout", "migrate_timeout", "deploy_timeout",
  "group", "balancer_server", "host", "blue_green",
}
local HEALTH_FIELDS = { "url", "timeout", "retries", "interval", "expect_body" }
local DEFAULT_FIELDS = { "health", "stabilize", "start_timeout", "stop_timeout", "migrate_timeout", "deploy_timeout" }

-- Optional timeouts in seconds, per service or in `defaults`. Absent means the flow's
-- own default: start/stop wait as long as systemd takes, migrate_timeout bounds migrate and
-- migrate_rollback (the flow uses 1800 s when absent), deploy_timeout bounds the rsync of a
-- deploy (1800 s when absent).
local TIMEOUT_FIELDS = { "start_timeout", "stop_timeout", "migrate_timeout", "deploy_timeout" }
local DEFAULT_HEALTH_FIELDS = { "timeout", "retries", "interval" }
local TOP_FIELDS = { "defaults", "groups", "services", "host" }
-- A replica group (`groups[NAME]`), its balancer table and its (reserved) canary.
local GROUP_FIELDS = { "max_unavailable", "balancer", "drain_timeout", "canary" }
local BALANCER_FIELDS = { "haproxy", "backend", "timeout", "interval" }
local CANARY_FIELDS = { "count", "soak", "analysis", "weight" }
-- A blue-green service (`blue_green`): its two colours, each an instance of the service's template unit.
local BLUE_GREEN_FIELDS = { "blue", "green", "balancer", "soak", "drain_timeout", "analysis" }
local COLOUR_FIELDS = { "working_dir", "health", "balancer_server" }
local COLOURS = { "blue", "green" }
-- What a blue-green service takes from its colours instead (each colour has its own).
local NOT_WITH_BLUE_GREEN = { "working_dir", "health", "group", "balancer_server", "reload" }
local GROUP_DEFAULTS = { max_unavailable = 1, drain_timeout = 30 }
-- HAProxy's server and backend names (rr.haproxy refuses anything else in a command line).
local HAPROXY_NAME = "^[A-Za-z0-9._:-]+$"
local HAPROXY_NAME_TEXT = "letters, digits and . - _ :"
local HEALTH_KINDS = { "systemd", "none" }

-- The range of every number (inclusive; nan and inf never pass):
--   * a timeout (the four above, health.timeout): 1 s to 24 h. Below a second a
--     healthy unit times out, and so does its rollback (the same bound applies to
--     it); 24 h is rr.http's own maximum, well inside what rr.systemd, rr.proc
--     and rr.sleep take (< 1e9 s).
--   * stabilize: 0 (none) to 24 h: beyond that the watch's wait would be
--     refused by rr.systemd and stabilization skipped.
--   * health.interval: 10 ms (the fast probe step of rr.health; shorter would
--     hammer the service) to 24 h, and not longer than health.timeout.
--   * health.retries: a whole number from 0 to 10000 (more only ever waits for
--     the deadline).
local DAY = 86400
local NUMBER_RULES = {
  timeout = { min = 1, max = DAY, what = "a number of seconds" },
  stabilize = { min = 0, max = DAY, what = "a number of seconds" },
  interval = { min = 0.01, max = DAY, what = "a number of seconds" },
  retries = { min = 0, max = 10000, what = "an integer", integer = true },
}

local UNIT_SUFFIXES = { "service", "socket", "target", "timer", "mount", "path" }
local UNIT_NAME_MAX = 255 -- systemd's UNIT_NAME_MAX

-- Instructions a services file may run before it is taken for an endless loop.
-- A real file, even generated in loops, needs a few thousand.
local LOAD_INSTRUCTION_LIMIT = 10000000

local function set_of(list)
  local set = {}
  for _, v in ipairs(list) do set[v] = true end
  return set
end

-- Built once: a set per field list (a 10,000-service file checks them 10,000 times).
local KNOWN = {
  [SERVICE_FIELDS] = set_of(SERVICE_FIELDS), [HEALTH_FIELDS] = set_of(HEALTH_FIELDS),
  [DEFAULT_FIELDS] = set_of(DEFAULT_FIELDS), [DEFAULT_HEALTH_FIELDS] = set_of(DEFAULT_HEALTH_FIELDS),
  [TOP_FIELDS] = set_of(TOP_FIELDS), [GROUP_FIELDS] = set_of(GROUP_FIELDS),
  [BALANCER_FIELDS] = set_of(BALANCER_FIELDS), [CANARY_FIELDS] = set_of(CANARY_FIELDS),
  [BLUE_GREEN_FIELDS] = set_of(BLUE_GREEN_FIELDS), [COLOUR_FIELDS] = set_of(COLOUR_FIELDS),
}
local UNIT_SUFFIX_SET = set_of(UNIT_SUFFIXES)

-- Quotes a string for a one-line message ("%q" would split on a newline).
local function quote(s)
  return (("%q"):format(s):gsub("\\\n", "\\n"))
end

-- Names a value's type for "must be X, got Y" messages.
local function describe(value)
  local t = type(value)
  if t == "string" then return "string " .. quote(value) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(value) end
  return t
end

-- Names a table key in a message: field "name" or field [1].
local function key_label(key)
  if type(key) == "string" then return quote(key) end
  if type(key) == "number" then return "[" .. tostring(key) .. "]" end
  return "[" .. type(key) .. "]"
end

-- Name comparisons one validation may spend on "did you mean" hints. One
-- comparison costs some 20 us, and an unknown dependency is compared with every
-- name: in a 10,000-service file with hundreds of unknown names, hints would
-- take minutes. Within the budget every hint is given (a hundred-service file
-- gets some 200); past it the rest of the file is reported without hints.
local HINT_BUDGET = 20000

-- A hinter for one validation run: hint(word, candidates, prefix) gives
-- " (did you mean "x"?)" for the closest candidate, or "". A typo is at most a
-- third of the word (and one edit in a short word). A word already looked up
-- in the same list costs nothing.
local function new_hinter()
  local budget, memo = HINT_BUDGET, {}
  return function(word, candidates, prefix)
    if type(word) ~= "string" then return "" end
    local seen = memo[candidates]
    if seen == nil then
      seen = {}
      memo[candidates] = seen
    end
    local best = seen[word]
    if best == nil then
      if budget < #candidates then return "" end
      budget = budget - #candidates
      best = suggest.closest(word, candidates) or false
      seen[word] = best
    end
    return best and (" (did you mean %s?)"):format(quote((prefix or "") .. best)) or ""
  end
end

-- Keys of a table in a fixed order (known fields first, in their order, then
-- the others sorted), so that the same file always gives the same messages.
local function sorted_unknown_keys(tbl, known)
  local unknown = {}
  for key in next, tbl do
    if not known[key] then unknown[#unknown + 1] = key end
  end
  table.sort(unknown, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "string" or ta == "number" then return a < b end
    return false
  end)
  return unknown
end

-- True when `tbl` is a sequence 1..n with nothing else in it.
local function is_array(tbl)
  local count = 0
  for _ in next, tbl do count = count + 1 end
  return count == #tbl, count
end

-- Says what keeps `tbl` from being an array, for messages.
local function non_array_reason(tbl)
  local n = #tbl
  for _, key in ipairs(sorted_unknown_keys(tbl, {})) do
    if math.type(key) ~= "integer" or key < 1 or key > n then
      return "a table with key " .. key_label(key)
    end
  end
  return "a table with holes (nil entries)"
end

local function is_finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
end

-- The directory part of a path ("." when there is none).
local function dirname(path)
  local dir = path:match("^(.*)/[^/]*$")
  if dir == nil then return "." end
  if dir == "" then return "/" end
  return dir
end

-- Resolves a relative path against a directory ("." keeps it relative).
local function resolve(base_dir, path)
  if path:sub(1, 1) == "/" or base_dir == nil or base_dir == "." then return path end
  if base_dir:sub(-1) == "/" then return base_dir .. path end
  return base_dir .. "/" .. path
end

-- Why a unit name is invalid, or nil when systemd would accept it for a unit
-- rrengine can restart (no templates without an instance).
local function unit_name_problem(unit)
  if #unit > UNIT_NAME_MAX then
    return ("is longer than %d characters"):format(UNIT_NAME_MAX)
  end
  local stem, suffix = unit:match("^(.*)%.([^.]*)$")
  if stem == nil or not UNIT_SUFFIX_SET[suffix] then
    return "must end in ." .. table.concat(UNIT_SUFFIXES, ", .")
  end
  local prefix, instance = stem:match("^([^@]*)@(.*)$")
  if prefix and instance:find("@", 1, true) then
    return "has more than one \"@\""
  end
  local function plain(part)
    return part:match("^[A-Za-z0-9:_.\\%-]+$") ~= nil
  end
  if prefix then
    if prefix == "" then return "has nothing before \"@\"" end
    if instance == "" then return "is a template (nothing between \"@\" and the suffix)" end
    if not plain(prefix) or not plain(instance) then
      return "may only contain letters, digits and : _ . \\ - (and one \"@\")"
    end
  elseif stem == "" then
    return "has nothing before the suffix"
  elseif not plain(stem) then
    return "may only contain letters, digits and : _ . \\ - (and one \"@\")"
  end
  return nil
end

-- Why a blue-green service's unit is unusable, or nil: a template PREFIX@.service whose two
-- instances (PREFIX@blue.service, PREFIX@green.service) are valid unit names.
local function template_problem(unit)
  local prefix = unit:match("^(.+)@%.service$")
  if not prefix then
    return "must be a template unit PREFIX@.service with blue_green (its instances PREFIX@blue.service and "
      .. "PREFIX@green.service are the two colours)"
  end
  return unit_name_problem(prefix .. "@blue.service")
end

-- Why a health URL is unusable, or nil: http or https with a host, nothing
-- that curl would read differently from the operator.
local function url_problem(url)
  if url:find("[%s%c]") then return "contains whitespace or control characters" end
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  if scheme == nil or (scheme:lower() ~= "http" and scheme:lower() ~= "https") then
    return "is not an http:// or https:// URL"
  end
  local authority = rest:match("^([^/?#]*)")
  local hostport = authority:match("@([^@]*)$") or authority
  local host, port
  if hostport:sub(1, 1) == "[" then
    host, port = hostport:match("^(%[[%x:.]+%])(.*)$")
  else
    host, port = hostport:match("^([^:]*)(.*)$")
  end
  if host == nil or host == "" then return "has no host" end
  if port ~= "" then
    local digits = port:match("^:(%d+)$")
    local number = digits and tonumber(digits)
    if number == nil or number < 1 or number > 65535 then return "has an invalid port" end
  end
  return nil
end

-- An ssh destination: [USER@]NAME or [USER@][V6] (brackets dropped). Returns the destination
-- as ssh takes it, or nil and why not. Never something ssh could read as an option (a leading
-- "-"), nor anything with whitespace or a control character.
function services.parse_host(value)
  if type(value) ~= "string" then return nil, "must be a string" end
  if value == "" then return nil, "must not be empty" end
  if value:find("[%s%c]") then return nil, "contains whitespace or control characters" end
  if value:sub(1, 1) == "-" then return nil, "must not start with \"-\" (ssh would take it for an option)" end
  local user, name = value:match("^(.*)@(.*)$")
  if user == nil then name = value end
  if user ~= nil and not user:match("^[A-Za-z0-9_][A-Za-z0-9._-]*$") then
    return nil, "has a bad user name (letters, digits and . _ - before \"@\")"
  end
  local v6 = name:match("^%[([%x:.]+)%]$")
  if v6 then
    if not v6:find(":", 1, true) then return nil, "has brackets around something that is not an IPv6 address" end
    name = v6
  elseif not name:match("^[A-Za-z0-9_][A-Za-z0-9._-]*$") then
    return nil, "must be NAME, USER@NAME or [IPV6] (a name: letters, digits and . _ -)"
  end
  return user and (user .. "@" .. name) or name
end

-- A `host` field (see services.parse_host). Returns the destination, or nil (reported).
local function check_host(report, where, value)
  local host, problem = services.parse_host(value)
  if host then return host end
  report.add(where, ("field \"host\" %s, got %s (an ssh destination: NAME, USER@NAME, USER@[IPV6])"):format(
    problem, describe(value)))
  return nil
end

-- One validation run: collects problems with the file's name in front.
local function new_report(source_name)
  local report = { problems = {}, hint = new_hinter() }
  function report.add(where, message)
    local prefix = source_name .. ": "
    if where then prefix = prefix .. where .. ": " end
    report.problems[#report.problems + 1] = prefix .. message
  end
  return report
end

-- Checks one field against a type; reports and returns false when wrong.
local function check_type(report, where, field, value, expected)
  if type(value) == expected then return true end
  report.add(where, ("field %s must be a %s, got %s"):format(quote(field), expected, describe(value)))
  return false
end

-- A number for a message, as written in a file: 1e-09, 1000000000, 2.5, and
-- "nan" whatever the C library prints for it.
local function show_number(x)
  if x ~= x then return "nan" end
  if math.type(x) == "float" then return ("%.14g"):format(x) end
  return tostring(x)
end

-- A number within NUMBER_RULES[kind] (an integer for an integer rule). Returns
-- it (as an integer for an integer rule) or nil, the problem reported.
local function check_number(report, where, field, value, kind)
  if not check_type(report, where, field, value, "number") then return nil end
  local rule = NUMBER_RULES[kind]
  local number = value
  if rule.integer then number = math.tointeger(value) end
  if number == nil or not is_finite(number) or number < rule.min or number > rule.max then
    report.add(where, ("field %s must be %s from %s to %s%s, got %s"):format(quote(field), rule.what,
      show_number(rule.min), show_number(rule.max), rule.max == DAY and " (24 h)" or "", show_number(value)))
    return nil
  end
  return number
end

-- Reports a health interval longer than the timeout it probes within. Each
-- value comes with where it was set (nil: in this table), and the message names
-- the field set here: the interval, unless only the timeout was.
local function check_interval_fits(report, where, interval, interval_from, timeout, timeout_from)
  if interval == nil or timeout == nil or interval <= timeout then return end
  local function shown(value, from)
    return from and ("%s, %s"):format(show_number(value), from) or show_number(value)
  end
  if interval_from ~= nil and timeout_from == nil then
    report.add(where, ("field \"health.timeout\" must not be shorter than \"health.interval\" (%s), got %s"):format(
      shown(interval, interval_from), show_number(timeout)))
  else
    report.add(where, ("field \"health.interval\" must not be longer than \"health.timeout\" (%s), got %s"):format(
      shown(timeout, timeout_from), show_number(interval)))
  end
end

-- An absolute path. Returns it or nil.
local function check_absolute(report, where, field, value)
  if not check_type(report, where, field, value, "string") then return nil end
  if value:sub(1, 1) ~= "/" then
    report.add(where, ("field %s must be an absolute path, got %s"):format(quote(field), quote(value)))
    return nil
  end
  if value:find("%z") then
    report.add(where, ("field %s contains a NUL byte"):format(quote(field)))
    return nil
  end
  return value
end

-- A non-empty list of non-empty strings (an argv or a name list). Returns a
-- copy or nil.
local function check_string_list(report, where, field, value, what)
  if type(value) ~= "table" then
    report.add(where, ("field %s must be %s, got %s"):format(quote(field), what, describe(value)))
    return nil
  end
  if not is_array(value) then
    report.add(where, ("field %s must be %s, got %s"):format(quote(field), what, non_array_reason(value)))
    return nil
  end
  local copy, ok = {}, true
  for i, item in ipairs(value) do
    local item_field = ("%s[%d]"):format(field, i)
    if type(item) ~= "string" then
      report.add(where, ("field %s must be a string, got %s"):format(quote(item_field), describe(item)))
      ok = false
    elseif item == "" then
      report.add(where, ("field %s must not be empty"):format(quote(item_field)))
      ok = false
    else
      copy[i] = item
    end
  end
  return ok and copy or nil
end

-- An argv array: non-empty list of strings.
local function check_argv(report, where, field, value)
  local argv = check_string_list(report, where, field, value, "an argv array of strings")
  if argv and #argv == 0 then
    report.add(where, ("field %s must not be empty (an argv array: { \"program\", \"arg\", ... })"):format(quote(field)))
    return nil
  end
  return argv
end

-- Reports the keys of `tbl` not in `known` (a list), with a hint.
local function check_unknown_fields(report, where, tbl, known, prefix)
  for _, key in ipairs(sorted_unknown_keys(tbl, KNOWN[known] or set_of(known))) do
    local label = type(key) == "string" and quote((prefix or "") .. key) or key_label(key)
    report.add(where, ("field %s is unknown%s"):format(label, report.hint(key, known, prefix)))
  end
end

-- The `defaults` table merged over the built-in defaults.
local function check_defaults(report, value)
  local defaults = {
    health = {
      timeout = BUILTIN_DEFAULTS.health.timeout,
      retries = BUILTIN_DEFAULTS.health.retries,
      interval = BUILTIN_DEFAULTS.health.interval,
    },
    stabilize = BUILTIN_DEFAULTS.stabilize,
  }
  if value == nil then return defaults end
  local where = "defaults"
  if type(value) ~= "table" then
    report.add(nil, ("field \"defaults\" must be a table, got %s"):format(describe(value)))
    return defaults
  end
  check_unknown_fields(report, where, value, DEFAULT_FIELDS)
  local health = value.health
  if health ~= nil and check_type(report, where, "health", health, "table") then
    check_unknown_fields(report, where, health, DEFAULT_HEALTH_FIELDS, "health.")
    -- A rejected value leaves the built-in one (the file is refused anyway).
    local timeout, interval
    if health.timeout ~= nil then
      timeout = check_number(report, where, "health.timeout", health.timeout, "timeout")
    end
    if health.retries ~= nil then
      defaults.health.retries = check_number(report, where, "health.retries", health.retries, "retries")
        or defaults.health.retries
    end
    if health.interval ~= nil then
      interval = check_number(report, where, "health.interval", health.interval, "interval")
    end
    -- Compared when every value given passed; one not given is the built-in one.
    if (timeout or interval) and (timeout or health.timeout == nil) and (interval or health.interval == nil) then
      check_interval_fits(report, where, interval or defaults.health.interval, not interval and "built in" or nil,
        timeout or defaults.health.timeout, not timeout and "built in" or nil)
    end
    defaults.health.timeout = timeout or defaults.health.timeout
    defaults.health.interval = interval or defaults.health.interval
  end
  if value.stabilize ~= nil then
    defaults.stabilize = check_number(report, where, "stabilize", value.stabilize, "stabilize") or defaults.stabilize
  end
  for _, field in ipairs(TIMEOUT_FIELDS) do
    if value[field] ~= nil then defaults[field] = check_number(report, where, field, value[field], "timeout") end
  end
  return defaults
end

-- The normalized health check of a service (defaults merged), or nil.
local function check_health(report, where, value, defaults)
  local health = {
    kind = "systemd",
    timeout = defaults.health.timeout,
    retries = defaults.health.retries,
    interval = defaults.health.interval,
  }
  if value == nil then return health end
  if type(value) == "string" then
    if value == "systemd" or value == "none" then
      health.kind = value
      return health
    end
    report.add(where, ("field \"health\" must be \"systemd\", \"none\" or a table { url = ... }, got %s%s"):format(
      quote(value), report.hint(value, HEALTH_KINDS)))
    return nil
  end
  if type(value) ~= "table" then
    report.add(where, ("field \"health\" must be \"systemd\", \"none\" or a table { url = ... }, got %s"):format(
      describe(value)))
    return nil
  end
  local ok = true
  check_unknown_fields(report, where, value, HEALTH_FIELDS, "health.")
  health.kind = "http"
  if value.url == nil then
    report.add(where, "field \"health.url\" is required when \"health\" is a table (use health = \"systemd\" for a unit-state check)")
    ok = false
  elseif check_type(report, where, "health.url", value.url, "string") then
    local problem = url_problem(value.url)
    if problem then
      report.add(where, ("field \"health.url\" %s: %s (expected http://HOST[:PORT]/PATH or https://...)"):format(
        problem, quote(value.url)))
      ok = false
    else
      health.url = value.url
    end
  else
    ok = false
  end
  local rejected = {}
  for _, field in ipairs(DEFAULT_HEALTH_FIELDS) do
    if value[field] ~= nil then
      local checked = check_number(report, where, "health." .. field, value[field], field)
      if checked == nil then ok, rejected[field] = false, true else health[field] = checked end
    end
  end
  -- Both from defaults: compared there, once. A rejected value: reported already.
  if (value.timeout ~= nil or value.interval ~= nil) and not rejected.timeout and not rejected.interval then
    check_interval_fits(report, where, health.interval, value.interval == nil and "from defaults" or nil,
      health.timeout, value.timeout == nil and "from defaults" or nil)
  end
  if value.expect_body ~= nil then
    if check_type(report, where, "health.expect_body", value.expect_body, "string") then
      health.expect_body = value.expect_body
    else
      ok = false
    end
  end
  return ok and health or nil
end

local NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]*$"

-- ---- replica groups ----

-- A budget of members: a whole number >= 1, or "N%" with N a whole number from 1 to 100.
-- Returns { count = n } or { percent = n }, or nil (reported).
local function check_budget(report, where, field, value)
  if type(value) == "string" then
    local digits = value:match("^(%d+)%%$")
    local n = digits and math.tointeger(tonumber(digits))
    if n and n >= 1 and n <= 100 then return { percent = n } end
  elseif math.type(value) == "integer" or (type(value) == "number" and math.tointeger(value)) then
    local n = math.tointeger(value)
    if n >= 1 then return { count = n } end
  end
  report.add(where, ("field %s must be a number of members (a whole number >= 1) or a percentage \"N%%\" from "
    .. "\"1%%\" to \"100%%\", got %s"):format(quote(field), describe(value)))
  return nil
end

-- Members a budget allows: a count as written, a percentage rounded down.
local function resolve_budget(budget, members)
  if budget.count then return budget.count end
  return members * budget.percent // 100
end

-- Why a balancer.haproxy address is unusable, or nil: an absolute path (the admin socket) or
-- HOST:PORT ([V6]:PORT), as rr.haproxy connects to them.
local function haproxy_address_problem(addr)
  if addr:sub(1, 1) == "/" then
    if addr:find("%z") then return "contains a NUL byte" end
    return nil
  end
  local port = addr:match("^%[[%x:.]+%]:(%d+)$") or addr:match("^[^:/%s%c%[%]]+:(%d+)$")
  local number = port and tonumber(port)
  if number == nil or number < 1 or number > 65535 then
    return "must be the admin socket's absolute path or HOST:PORT"
  end
  return nil
end

-- A path relative to the services file's directory (as `hooks`). Returns it resolved or nil.
local function check_script_path(report, where, field, value, base_dir)
  if not check_type(report, where, field, value, "string") then return nil end
  if value == "" then
    report.add(where, ("field %s must not be empty"):format(quote(field)))
    return nil
  end
  if value:find("%z") then
    report.add(where, ("field %s contains a NUL byte"):format(quote(field)))
    return nil
  end
  return resolve(base_dir, value)
end

-- A group's balancer: { haproxy = SOCKET, backend = NAME [, timeout =] [, interval =] } (a
-- copy), or a script's path (resolved). nil when a problem was reported.
local function check_balancer(report, where, value, base_dir)
  if type(value) == "string" then return check_script_path(report, where, "balancer", value, base_dir) end
  if type(value) ~= "table" then
    report.add(where, ("field \"balancer\" must be { haproxy = SOCKET, backend = NAME } or the path of a Lua "
      .. "script, got %s"):format(describe(value)))
    return nil
  end
  local before = #report.problems
  check_unknown_fields(report, where, value, BALANCER_FIELDS, "balancer.")
  local out = {}
  if value.haproxy == nil then
    report.add(where, "field \"balancer.haproxy\" is required when \"balancer\" is a table (HAProxy's admin socket: "
      .. "an absolute path or HOST:PORT)")
  elseif check_type(report, where, "balancer.haproxy", value.haproxy, "string") then
    local problem = haproxy_address_problem(value.haproxy)
    if problem then
      report.add(where, ("field \"balancer.haproxy\" %s, got %s"):format(problem, quote(value.haproxy)))
    end
    out.haproxy = value.haproxy
  end
  if value.backend == nil then
    report.add(where, "field \"balancer.backend\" is required when \"balancer\" is a table (the HAProxy backend "
      .. "of the group's servers)")
  elseif check_type(report, where, "balancer.backend", value.backend, "string") then
    if not value.backend:match(HAPROXY_NAME) then
      report.add(where, ("field \"balancer.backend\" must be %s (an HAProxy backend name), got %s"):format(
        HAPROXY_NAME_TEXT, quote(value.backend)))
    end
    out.backend = value.backend
  end
  if value.timeout ~= nil then out.timeout = check_number(report, where, "balancer.timeout", value.timeout, "timeout") end
  if value.interval ~= nil then
    out.interval = check_number(report, where, "balancer.interval", value.interval, "interval")
  end
  if #report.problems > before then return nil end
  return out
end

-- A canary's balancer weight while it soaks: an HAProxy weight from 1 to 256, or "N%" (1 to 100)
-- of the server's configured weight. 0 would be no traffic, which no soak can judge.
local function check_canary_weight(report, where, value)
  if type(value) == "string" then
    local digits = value:match("^(%d+)%%$")
    local n = digits and math.tointeger(tonumber(digits))
    if n and n >= 1 and n <= 100 then return value end
  elseif math.type(value) == "integer" or (type(value) == "number" and math.tointeger(value)) then
    local n = math.tointeger(value)
    if n >= 1 and n <= 256 then return n end
  end
  report.add(where, ("field \"canary.weight\" must be a balancer weight (a whole number from 1 to 256) or a "
    .. "percentage of the server's configured weight \"N%%\" from \"1%%\" to \"100%%\", got %s"):format(describe(value)))
  return nil
end

-- A group's canary: { count, soak, analysis, weight }.
local function check_canary(report, where, value, base_dir)
  if type(value) ~= "table" then
    report.add(where, ("field \"canary\" must be a table { count = ..., soak = ..., analysis = ... }, got %s"):format(
      describe(value)))
    return nil
  end
  local before = #report.problems
  check_unknown_fields(report, where, value, CANARY_FIELDS, "canary.")
  local canary = { count = 1, budget = { count = 1 } }
  if value.count ~= nil then
    canary.count = value.count
    canary.budget = check_budget(report, where, "canary.count", value.count)
  end
  if value.soak ~= nil then canary.soak = check_number(report, where, "canary.soak", value.soak, "stabilize") end
  if value.analysis ~= nil then
    canary.analysis = check_script_path(report, where, "canary.analysis", value.analysis, base_dir)
  end
  if value.weight ~= nil then canary.weight = check_canary_weight(report, where, value.weight) end
  if #report.problems > before then return nil end
  return canary
end

-- Validates one entry of `groups`; returns the group (members filled in later) or nil.
local function check_group(report, name, value, base_dir)
  local where = "group " .. quote(name)
  if type(value) ~= "table" then
    report.add(where, ("must be a table { max_unavailable = ..., balancer = ..., drain_timeout = ... }, got %s"):format(
      describe(value)))
    return nil
  end
  local before = #report.problems
  check_unknown_fields(report, where, value, GROUP_FIELDS)
  local group = { name = name, max_unavailable = GROUP_DEFAULTS.max_unavailable, budget = { count = 1 },
                  drain_timeout = GROUP_DEFAULTS.drain_timeout, members = {} }
  if value.max_unavailable ~= nil then
    group.max_unavailable = value.max_unavailable
    group.budget = check_budget(report, where, "max_unavailable", value.max_unavailable)
  end
  if value.balancer ~= nil then group.balancer = check_balancer(report, where, value.balancer, base_dir) end
  if value.drain_timeout ~= nil then
    group.drain_timeout = check_number(report, where, "drain_timeout", value.drain_timeout, "timeout")
  end
  if value.canary ~= nil then group.canary = check_canary(report, where, value.canary, base_dir) end
  if group.canary and group.canary.weight ~= nil and value.balancer == nil then
    report.add(where, "field \"canary.weight\" needs a \"balancer\" (the weight is the canary's server weight there)")
  end
  if #report.problems > before then return nil end
  return group
end

-- The `groups` table: name -> raw entry for every usable name (so that members name them even
-- when the entry has problems), and name -> validated group for the entries without problems.
local function check_groups(report, value, base_dir)
  local raw, checked, names = {}, {}, {}
  if value == nil then return raw, checked, names end
  if type(value) ~= "table" then
    report.add(nil, ("field \"groups\" must be a table keyed by group name, got %s"):format(describe(value)))
    return raw, checked, names
  end
  for _, key in ipairs(sorted_unknown_keys(value, {})) do
    if type(key) ~= "string" then
      report.add(nil, ("field \"groups\" must be keyed by group name, got key %s"):format(key_label(key)))
    elseif not key:match(NAME_PATTERN) then
      report.add(nil, ("field \"groups\": group name %s must be letters, digits and . _ : @ - (starting with a letter "
        .. "or digit)"):format(quote(key)))
    else
      raw[key] = value[key]
      names[#names + 1] = key
    end
  end
  for _, name in ipairs(names) do checked[name] = check_group(report, name, raw[name], base_dir) end
  return raw, checked, names
end

-- A member's group and balancer_server fields (in check_service).
local function check_membership(report, where, entry, svc, ctx)
  if entry.group ~= nil and check_type(report, where, "group", entry.group, "string") then
    if ctx.group_raw[entry.group] == nil then
      report.add(where, ("field \"group\" names unknown group %s%s"):format(quote(entry.group),
        report.hint(entry.group, ctx.group_names)))
    else
      svc.group = entry.group
    end
  end
  if entry.balancer_server ~= nil and check_type(report, where, "balancer_server", entry.balancer_server, "string") then
    local raw = type(entry.group) == "string" and ctx.group_raw[entry.group]
    if not entry.balancer_server:match(HAPROXY_NAME) then
      report.add(where, ("field \"balancer_server\" must be %s (an HAProxy server name), got %s"):format(
        HAPROXY_NAME_TEXT, quote(entry.balancer_server)))
    elseif entry.group == nil then
      report.add(where, "field \"balancer_server\" needs \"group\" (the name of the member's server at its group's "
        .. "balancer)")
    elseif raw ~= nil and not (type(raw) == "table" and raw.balancer ~= nil) then
      report.add(where, ("field \"balancer_server\" needs a balancer: group %s has none"):format(quote(entry.group)))
    else
      svc.balancer_server = entry.balancer_server
    end
  end
end

-- Walks the dependencies from `start` (iteratively: a chain of 150,000 services must not
-- overflow the C stack) and records in toward[name] the next step from name towards a service
-- of `target` (a set), false when there is none; each service is walked once per memo.
-- `pruned(name)` true skips a service known to lead nowhere.
local VISITING = {}
local function walk(deps_of, start, target, toward, pruned)
  toward[start] = VISITING
  local stack = { { node = start, i = 0 } }
  while #stack > 0 do
    local top = stack[#stack]
    local d = (deps_of[top.node] or {})[top.i + 1]
    if d == nil then
      toward[top.node] = false
      stack[#stack] = nil
    elseif target[d] then
      toward[top.node] = d
      stack[#stack] = nil
    else
      local t = toward[d]
      if t == nil and pruned and pruned(d) then
        toward[d], t = false, false
      end
      if t == nil then
        toward[d] = VISITING
        stack[#stack + 1] = { node = d, i = 0 }
      else
        top.i = top.i + 1
        if t ~= false and t ~= VISITING then
          toward[top.node] = d
          stack[#stack] = nil
        end
      end
    end
  end
end

-- Another member of `member`'s group that it depends on, directly or through other services:
-- the path { member, ..., other }, or nil. `toward` is the group's memo, `pruned` skips the
-- services from which no member of any group can be reached.
local function member_dependency(deps_of, member, in_group, toward, pruned)
  for _, d in ipairs(deps_of[member] or {}) do
    if in_group[d] then return { member, d } end
    if toward[d] == nil then
      if pruned(d) then toward[d] = false else walk(deps_of, d, in_group, toward, pruned) end
    end
    if toward[d] and toward[d] ~= VISITING then
      local path, node = { member, d }, d
      while not in_group[node] do
        node = toward[node]
        path[#path + 1] = node
      end
      return path
    end
  end
  return nil
end

-- What needs the members: each group's member list (declaration order), its budget resolved,
-- no group without members, no budget of 0 members, servers named as the balancer allows and
-- at most once, no member depending on another.
local function check_group_members(report, entries, ctx, graph)
  local deps_of, any_member = {}, {}
  for _, node in ipairs(graph) do deps_of[node.name] = node.depends end
  for i, entry in ipairs(entries) do
    if type(entry) == "table" and type(entry.name) == "string" and ctx.first_index_of[entry.name] == i
      and type(entry.group) == "string" and ctx.groups[entry.group] then
      local members = ctx.groups[entry.group].members
      members[#members + 1] = entry.name
      any_member[entry.name] = true
    end
  end
  -- One walk of the whole graph finds the services that lead to no member at all (a shared
  -- database under a long chain): each group's walk skips them, so a platform of thousands of
  -- groups above a deep chain is checked in one pass over the chain, not one per group.
  local toward_any = {}
  local function pruned(name)
    if any_member[name] then return false end
    if toward_any[name] == nil then walk(deps_of, name, any_member, toward_any) end
    return toward_any[name] == false
  end
  for _, name in ipairs(ctx.group_names) do
    local group = ctx.groups[name]
    if group then
      local where = "group " .. quote(name)
      local members = group.members
      local n = #members
      if n == 0 then
        report.add(where, ("has no members (no service says group = %s)"):format(quote(name)))
      else
        group.max_unavailable_count = resolve_budget(group.budget, n)
        if group.max_unavailable_count == 0 then
          report.add(where, ("field \"max_unavailable\" %s of %d member%s is 0 members: the budget can never be met "
            .. "(no member could ever be taken down; use at least %d%%, or a count)"):format(quote(group.max_unavailable),
            n, n == 1 and "" or "s", (100 + n - 1) // n))
        end
        if group.canary then
          group.canary.count_members = resolve_budget(group.canary.budget, n)
          if group.canary.count_members == 0 then
            report.add(where, ("field \"canary.count\" %s of %d member%s is 0 members: no member would roll first "
              .. "(use at least %d%%, or a count)"):format(quote(group.canary.count), n, n == 1 and "" or "s",
              (100 + n - 1) // n))
          end
        end
        local servers, in_group, toward = {}, {}, {}
        for _, member in ipairs(members) do in_group[member] = true end
        for _, member in ipairs(members) do
          local entry = entries[ctx.first_index_of[member]]
          local server = entry.balancer_server
          if type(group.balancer) == "table" and server == nil and not member:match(HAPROXY_NAME) then
            report.add("service " .. quote(member), ("its name is not an HAProxy server name (%s): set "
              .. "\"balancer_server\" to the server's name in backend %s"):format(HAPROXY_NAME_TEXT,
              quote(group.balancer.backend)))
          end
          server = type(server) == "string" and server or member
          if group.balancer and servers[server] then
            report.add("service " .. quote(member), ("balancer server %s is also the server of service %s in group %s")
              :format(quote(server), quote(servers[server]), quote(name)))
          end
          servers[server] = servers[server] or member
          local path = member_dependency(deps_of, member, in_group, toward, pruned)
          if path then
            report.add(where, ("member %s depends on member %s (%s): the members of a group are replicas that roll "
              .. "side by side within its budget, so none may depend on another"):format(quote(member),
              quote(path[#path]), table.concat(path, " -> ")))
          end
        end
      end
    end
  end
end

-- A service's `blue_green`: both colours (an instance of the template each, its own working
-- dir, health URL and balancer server, none shared), the balancer that switches between them,
-- soak, drain_timeout and analysis. Returns { blue =, green =, balancer =, soak =,
-- drain_timeout = [, analysis =] }, a colour being { colour, unit, working_dir, health,
-- balancer_server }; nil when a problem was reported.
local function check_blue_green(report, where, entry, svc, ctx)
  local value = entry.blue_green
  if type(value) ~= "table" then
    report.add(where, ("field \"blue_green\" must be a table { blue = {...}, green = {...}, balancer = ... }, got %s")
      :format(describe(value)))
    return nil
  end
  local before = #report.problems
  check_unknown_fields(report, where, value, BLUE_GREEN_FIELDS, "blue_green.")
  for _, field in ipairs(NOT_WITH_BLUE_GREEN) do
    if entry[field] ~= nil then
      report.add(where, ("field %s cannot go with \"blue_green\" (%s)"):format(quote(field),
        (field == "working_dir" or field == "health" or field == "balancer_server")
          and ("each colour has its own: blue_green.blue." .. field .. ", blue_green.green." .. field)
          or field == "group" and "a blue-green service is not a replica of a group"
          or "the idle colour is started, never reloaded"))
    end
  end
  local out = { soak = 30, drain_timeout = GROUP_DEFAULTS.drain_timeout }
  local prefix = type(entry.unit) == "string" and entry.unit:match("^(.+)@%.service$")
  local seen = { working_dir = {}, url = {}, server = {} }
  for _, colour in ipairs(COLOURS) do
    local c = value[colour]
    local field = "blue_green." .. colour
    if c == nil then
      report.add(where, ("field %s is required (its working_dir, health and balancer_server)"):format(quote(field)))
    elseif type(c) ~= "table" then
      report.add(where, ("field %s must be a table { working_dir = ..., health = { url = ... }, balancer_server = ... }, "
        .. "got %s"):format(quote(field), describe(c)))
    else
      check_unknown_fields(report, where, c, COLOUR_FIELDS, field .. ".")
      local col = { colour = colour, unit = prefix and (prefix .. "@" .. colour .. ".service") or nil }
      if c.working_dir == nil then
        report.add(where, ("field %s is required"):format(quote(field .. ".working_dir")))
      else
        col.working_dir = check_absolute(report, where, field .. ".working_dir", c.working_dir)
      end
      if c.health == nil or type(c.health) ~= "table" then
        report.add(where, ("field %s must be a table { url = \"http://...\" } (the switch needs each colour's own "
          .. "probe), got %s"):format(quote(field .. ".health"), describe(c.health)))
      else
        col.health = check_health(report, where .. ": " .. field, c.health, ctx.defaults)
      end
      if c.balancer_server == nil then
        report.add(where, ("field %s is required (the colour's server at the balancer)"):format(
          quote(field .. ".balancer_server")))
      elseif check_type(report, where, field .. ".balancer_server", c.balancer_server, "string") then
        if not c.balancer_server:match(HAPROXY_NAME) then
          report.add(where, ("field %s must be %s (an HAProxy server name), got %s"):format(
            quote(field .. ".balancer_server"), HAPROXY_NAME_TEXT, quote(c.balancer_server)))
        end
        col.balancer_server = c.balancer_server
      end
      for key, v in pairs({ working_dir = col.working_dir, url = col.health and col.health.url,
          server = col.balancer_server }) do
        local other = seen[key][key == "working_dir" and v:gsub("/+$", "") or v]
        if other then
          report.add(where, ("field %s is the same as blue_green.%s's: each colour needs its own"):format(
            quote(field .. "." .. (key == "url" and "health.url" or key == "server" and "balancer_server" or key)),
            other))
        end
        seen[key][key == "working_dir" and v:gsub("/+$", "") or v] = colour
      end
      if col.unit then
        local key = (svc.host or "") .. "\0" .. col.unit
        if ctx.unit_owner[key] then
          report.add(where, ("field %s: its instance %s is also the unit of %s"):format(quote(field), quote(col.unit),
            ctx.unit_owner[key]))
        else
          ctx.unit_owner[key] = where
        end
      end
      out[colour] = col
    end
  end
  if value.balancer == nil then
    report.add(where, "field \"blue_green.balancer\" is required (where traffic switches between the colours: "
      .. "{ haproxy = SOCKET, backend = NAME } or the path of a Lua script)")
  else
    local b = check_balancer(report, where .. ": blue_green", value.balancer, ctx.base_dir)
    out.balancer = b
  end
  if value.soak ~= nil then out.soak = check_number(report, where, "blue_green.soak", value.soak, "stabilize") end
  if value.drain_timeout ~= nil then
    out.drain_timeout = check_number(report, where, "blue_green.drain_timeout", value.drain_timeout, "timeout")
  end
  if value.analysis ~= nil then
    out.analysis = check_script_path(report, where, "blue_green.analysis", value.analysis, ctx.base_dir)
  end
  if #report.problems > before then return nil end
  return out
end

-- The label of service i in messages: its name when it has a usable one.
local function service_label(i, entry, first_index_of)
  if type(entry) == "table" and type(entry.name) == "string" and entry.name ~= "" then
    if first_index_of[entry.name] ~= i then
      return ("service %s (services[%d])"):format(quote(entry.name), i)
    end
    return "service " .. quote(entry.name)
  end
  return ("services[%d]"):format(i)
end

-- Validates one service entry; returns the normalized service (nil when a
-- problem was found, the problem being reported).
local function check_service(report, i, entry, ctx)
  local where = service_label(i, entry, ctx.first_index_of)
  if type(entry) ~= "table" then
    report.add(nil, ("services[%d] must be a table { name = ..., unit = ... }, got %s"):format(i, describe(entry)))
    return nil
  end
  local before = #report.problems
  local svc = { index = i }

  check_unknown_fields(report, where, entry, SERVICE_FIELDS)

  -- name
  if entry.name == nil then
    report.add(where, "field \"name\" is required")
  elseif check_type(report, where, "name", entry.name, "string") then
    if not entry.name:match(NAME_PATTERN) then
      report.add(where, ("field \"name\" must be letters, digits and . _ : @ - (starting with a letter or digit), got %s"):format(
        quote(entry.name)))
    elseif ctx.first_index_of[entry.name] ~= i then
      report.add(where, ("field \"name\" duplicates services[%d]"):format(ctx.first_index_of[entry.name]))
    end
    svc.name = entry.name
  end

  -- before the unit: a unit name is one per host. false: this machine, whatever the top-level
  -- host says.
  svc.host = ctx.host
  if entry.host == false then
    svc.host = nil
  elseif entry.host ~= nil then
    svc.host = check_host(report, where, entry.host)
  end

  -- unit
  if entry.unit == nil then
    report.add(where, "field \"unit\" is required")
  elseif check_type(report, where, "unit", entry.unit, "string") then
    local problem
    if entry.blue_green ~= nil then problem = template_problem(entry.unit) else problem = unit_name_problem(entry.unit) end
    if problem then
      report.add(where, ("field \"unit\" is not a valid systemd unit name: %s %s"):format(quote(entry.unit), problem))
    else
      local key = (svc.host or "") .. "\0" .. entry.unit
      local other = ctx.unit_owner[key]
      if other then
        report.add(where, ("field \"unit\" %s is also the unit of %s%s"):format(quote(entry.unit), other,
          svc.host and (" on host " .. svc.host) or ""))
      else
        ctx.unit_owner[key] = where
      end
      svc.unit = entry.unit
    end
  end

  if entry.kind ~= nil and check_type(report, where, "kind", entry.kind, "string") then
    svc.kind = entry.kind
  end

  -- depends
  svc.depends = {}
  if entry.depends ~= nil then
    local depends = check_string_list(report, where, "depends", entry.depends, "an array of service names")
    if depends then
      local seen = {}
      for _, dep in ipairs(depends) do
        if seen[dep] then
          report.add(where, ("field \"depends\" lists %s more than once"):format(quote(dep)))
        elseif dep == entry.name then
          report.add(where, "field \"depends\" names the service itself")
        elseif ctx.first_index_of[dep] == nil then
          report.add(where, ("field \"depends\" names unknown service %s%s"):format(quote(dep), report.hint(dep, ctx.names)))
        end
        seen[dep] = true
      end
      svc.depends = depends
    end
  end

  svc.health = check_health(report, where, entry.health, ctx.defaults)

  svc.stabilize = ctx.defaults.stabilize
  if entry.stabilize ~= nil then
    svc.stabilize = check_number(report, where, "stabilize", entry.stabilize, "stabilize")
  end

  if entry.working_dir ~= nil then
    svc.working_dir = check_absolute(report, where, "working_dir", entry.working_dir)
  end

  for _, field in ipairs({ "migrate", "migrate_rollback" }) do
    if entry[field] ~= nil then
      svc[field] = check_argv(report, where, field, entry[field])
      if entry.working_dir == nil and entry.blue_green == nil then
        report.add(where, ("field %s needs \"working_dir\" (the command runs there)"):format(quote(field)))
      end
    end
  end

  for _, field in ipairs({ "reload", "deploy_delete" }) do
    svc[field] = false
    if entry[field] ~= nil and check_type(report, where, field, entry[field], "boolean") then
      svc[field] = entry[field]
    end
  end

  if entry.hooks ~= nil and check_type(report, where, "hooks", entry.hooks, "string") then
    if entry.hooks == "" then
      report.add(where, "field \"hooks\" must not be empty")
    else
      svc.hooks = resolve(ctx.base_dir, entry.hooks)
    end
  end

  for _, field in ipairs(TIMEOUT_FIELDS) do
    svc[field] = ctx.defaults[field]
    if entry[field] ~= nil then svc[field] = check_number(report, where, field, entry[field], "timeout") end
  end

  check_membership(report, where, entry, svc, ctx)

  if entry.blue_green ~= nil then svc.blue_green = check_blue_green(report, where, entry, svc, ctx) end

  if #report.problems > before then return nil end
  return svc
end

-- Validates a platform table (what a services file returns). `source_name`
-- names it in messages (default "services"); relative `hooks` paths resolve
-- against `base_dir` (default: the directory of source_name).
-- Returns platform = { source, defaults, services = { normalized, declaration
-- order }, by_name = { [name] = service }, groups = { [name] = group } }, or nil,
-- problems (a list of one-line strings, every problem found). A group is
-- { name, max_unavailable (as written), max_unavailable_count (members),
-- balancer (nil, { haproxy, backend [, timeout] [, interval] } or a script's
-- path), drain_timeout, members = { names, declaration order }[, canary =
-- { count, count_members[, soak][, analysis][, weight] }] }; its members have `group`
-- and, when it has a balancer, `balancer_server` (default: the service name).
function services.validate(tbl, source_name, base_dir)
  if source_name ~= nil and type(source_name) ~= "string" then
    error("rr.services.validate: source_name must be a string, got " .. type(source_name), 2)
  end
  if base_dir ~= nil and type(base_dir) ~= "string" then
    error("rr.services.validate: base_dir must be a string, got " .. type(base_dir), 2)
  end
  source_name = source_name or "services"
  base_dir = base_dir or dirname(source_name)
  local report = new_report(source_name)

  if type(tbl) ~= "table" then
    report.add(nil, ("must return a table { services = { ... } }, got %s"):format(describe(tbl)))
    return nil, report.problems
  end
  check_unknown_fields(report, nil, tbl, TOP_FIELDS)
  local defaults = check_defaults(report, tbl.defaults)
  local group_raw, groups, group_names = check_groups(report, tbl.groups, base_dir)
  local default_host
  if tbl.host ~= nil then default_host = check_host(report, nil, tbl.host) end

  local entries = tbl.services
  if entries == nil then
    report.add(nil, "field \"services\" is required (a list of { name = ..., unit = ... })")
    return nil, report.problems
  end
  if type(entries) ~= "table" then
    report.add(nil, ("field \"services\" must be an array of services, got %s"):format(describe(entries)))
    return nil, report.problems
  end
  if not is_array(entries) then
    report.add(nil, ("field \"services\" must be an array of services, got %s"):format(non_array_reason(entries)))
    return nil, report.problems
  end

  -- Names first, so that dependencies on services declared later resolve.
  local ctx = { defaults = defaults, host = default_host, base_dir = base_dir, first_index_of = {}, names = {},
                unit_owner = {},
                group_raw = group_raw, groups = groups, group_names = group_names }
  for i, entry in ipairs(entries) do
    if type(entry) == "table" and type(entry.name) == "string" and ctx.first_index_of[entry.name] == nil then
      ctx.first_index_of[entry.name] = i
      ctx.names[#ctx.names + 1] = entry.name
    end
  end

  local normalized = {}
  for i, entry in ipairs(entries) do
    normalized[i] = check_service(report, i, entry, ctx) or false
  end

  -- Cycles among the services whose names are usable; self dependencies were
  -- reported above with their field.
  local graph = {}
  for i, entry in ipairs(entries) do
    if type(entry) == "table" and type(entry.name) == "string" and ctx.first_index_of[entry.name] == i then
      local depends = type(entry.depends) == "table" and is_array(entry.depends) and entry.depends or {}
      local names = {}
      for _, dep in ipairs(depends) do
        if type(dep) == "string" then names[#names + 1] = dep end
      end
      graph[#graph + 1] = { name = entry.name, depends = names }
    end
  end
  for _, cycle in ipairs(dag.find_cycles(graph)) do
    if #cycle > 2 then
      report.add("service " .. quote(cycle[1]), "field \"depends\" forms a dependency cycle: " .. dag.format_cycle(cycle))
    end
  end

  if #group_names > 0 then check_group_members(report, entries, ctx, graph) end

  if #report.problems > 0 then return nil, report.problems end

  local platform = { source = source_name, defaults = defaults, services = normalized, by_name = {}, groups = {},
                     host = default_host }
  for _, svc in ipairs(normalized) do platform.by_name[svc.name] = svc end
  for name, group in pairs(groups) do
    group.budget = nil
    if group.canary then group.canary.budget = nil end
    platform.groups[name] = group
    for _, member in ipairs(group.members) do
      local svc = platform.by_name[member]
      if group.balancer then svc.balancer_server = svc.balancer_server or member end
    end
  end
  return platform
end

-- The services that live on another host (svc.host set), in declaration order.
function services.remote_services(platform)
  local out = {}
  for _, svc in ipairs(platform.services) do
    if svc.host then out[#out + 1] = svc end
  end
  return out
end

-- The globals a services file may use: enough to build tables in loops and
-- format strings, nothing that reads the outside world (os, io, require) or
-- varies between runs (math.random), so that loading is deterministic. This is
-- hygiene for a data file, not a security boundary against its author.
local function sandbox_env()
  local function copy(lib, except)
    local t = {}
    for k, v in pairs(lib) do
      if not (except and except[k]) then t[k] = v end
    end
    return t
  end
  return {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    select = select, tonumber = tonumber, tostring = tostring, type = type,
    rawequal = rawequal, rawget = rawget, rawlen = rawlen,
    string = copy(string, { rep = true, dump = true }),
    table = copy(table),
    math = copy(math, { random = true, randomseed = true }),
    utf8 = copy(utf8),
  }
end

-- Makes an error from the file one line, with the file's full path in front
-- (Lua shortens long chunk names to ".../tail").
local function one_line_error(path, message)
  if type(message) ~= "string" then
    -- error({}) and friends: the value itself would print an address.
    return ("%s: raised an error that is not a message (a %s)"):format(path, type(message))
  end
  message = message:gsub("[\r\n]+%s*", " ")
  local shown, line, rest = message:match("^(.-):(%d+): (.*)$")
  if shown and (shown == path or (shown:sub(1, 3) == "..." and path:sub(-(#shown - 3)) == shown:sub(4))) then
    return ("%s:%s: %s"):format(path, line, rest)
  end
  return path .. ": " .. message
end

-- Seconds a services file may take to load (wall clock): the instruction limit
-- does not see time spent inside C calls, such as a slow string.find in a loop.
services.LOAD_TIMEOUT = 10

-- Loads and validates a services file. Returns the platform (see validate),
-- or nil, problems: every validation problem, or one line for a file that
-- cannot be read, does not compile, fails while running, or runs too long.
function services.load(path)
  if type(path) ~= "string" then
    error("rr.services.load: path must be a string, got " .. type(path), 2)
  end
  local file, open_err = io.open(path, "rb")
  if not file then
    -- io.open's message is "PATH: reason"; keep the reason only.
    local reason = open_err and open_err:match(": ([^:]*)$") or tostring(open_err)
    return nil, { ("%s: cannot read the services file: %s"):format(path, reason) }
  end
  local source, read_err = file:read("a")
  file:close()
  if source == nil then
    return nil, { ("%s: cannot read the services file: %s"):format(path, tostring(read_err)) }
  end
  -- As lua's loadfile: skip a UTF-8 BOM and a first "#" line (keeping line
  -- numbers right).
  source = source:gsub("^\239\187\191", "")
  if source:sub(1, 1) == "#" then source = source:gsub("^[^\n]*", "") end

  -- Text only: a precompiled chunk could crash the interpreter.
  local chunk, syntax_err = load(source, "@" .. path, "t", sandbox_env())
  if not chunk then return nil, { one_line_error(path, syntax_err) } end

  -- A task of its own, bounded in instructions and time (rr.chunk).
  local ok, result, code = require("rr.chunk").run(chunk,
    { instructions = LOAD_INSTRUCTION_LIMIT, seconds = services.LOAD_TIMEOUT, name = path })
  if not ok then
    return nil, { code == "ETIMEDOUT" and result or one_line_error(path, result) }
  end
  return services.validate(result, path)
end

return services
