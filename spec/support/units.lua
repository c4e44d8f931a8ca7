-- spec/support/units.lua: write fixture unit files into the sandbox's unit directory.
-- Pure Lua (and lua-filesystem); needs only the variables `spec/support/sandbox` exports
-- (RR_SANDBOX_UNIT_DIR, and RR_SANDBOX_PID / RR_SANDBOX_DIR when present).
--
--   local units = require("spec.support.units")   -- or dofile(".../units.lua")
--   local port = units.free_port()
--   units.fixture_unit("api.service", port, { warmup = 1, control_file = ctl })
--   -- then daemon-reload and start through rr.systemd (or systemctl --user)
--   units.control(ctl, { status = 500 })          -- the running service turns unhealthy
--
-- Nothing here talks to systemd: after writing or removing a unit, the spec
-- daemon-reloads the manager itself.

local units = {}

-- lua-filesystem comes with busted (Debian's lua-busted depends on it).
local lfs = require("lfs")

-- Repository root, from this file's own path (spec/support/units.lua). A relative
-- path (busted's "./spec/support/units.lua") is taken from the current directory:
-- the unit files need an absolute path that another process (the manager) can use.
local function repo_root()
  local src = debug.getinfo(1, "S").source
  local path = src:sub(1, 1) == "@" and src:sub(2) or "spec/support/units.lua"
  if path:sub(1, 1) ~= "/" then
    path = (lfs.currentdir() or os.getenv("PWD") or ".") .. "/" .. path
  end
  -- Normalize "." and ".."; then strip units.lua, support and spec.
  local parts = {}
  for part in path:gmatch("[^/]+") do
    if part == ".." then
      table.remove(parts)
    elseif part ~= "." then
      parts[#parts + 1] = part
    end
  end
  for _ = 1, 3 do table.remove(parts) end
  return "/" .. table.concat(parts, "/")
end

-- mkdir -p.
local function mkdir_p(dir)
  local path = dir:sub(1, 1) == "/" and "" or "."
  for part in dir:gmatch("[^/]+") do
    path = path .. "/" .. part
    if lfs.attributes(path, "mode") == nil then
      local ok, err = lfs.mkdir(path)
      if not ok and lfs.attributes(path, "mode") ~= "directory" then
        error("cannot create " .. path .. ": " .. tostring(err), 3)
      end
    end
  end
end

units.root = repo_root()
-- The fixture server binary (`make` builds it as build/fixture; $RR_FIXTURE_BIN
-- overrides it).
units.fixture_bin = os.getenv("RR_FIXTURE_BIN") or (units.root .. "/build/fixture")

-- The sandbox's unit directory ($RR_SANDBOX_UNIT_DIR); raises outside a sandbox.
function units.dir()
  local dir = os.getenv("RR_SANDBOX_UNIT_DIR")
  if not dir or dir == "" then
    error("RR_SANDBOX_UNIT_DIR is not set: run under spec/support/sandbox", 2)
  end
  return dir
end

-- Write content to path atomically: a temp file beside it, then rename, so the
-- manager (or a fixture re-reading its control file) never sees half a file.
local function write_atomic(path, content)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "w")
  if not f then error("cannot write " .. tmp .. ": " .. err, 3) end
  local ok, werr = f:write(content)
  f:close()
  if not ok then
    os.remove(tmp)
    error("cannot write " .. tmp .. ": " .. tostring(werr), 3)
  end
  local rok, rerr = os.rename(tmp, path)
  if not rok then
    os.remove(tmp)
    error("cannot rename " .. tmp .. ": " .. rerr, 3)
  end
end

-- "name" -> "name.service" when it has no unit suffix.
local function unit_name(name)
  if type(name) ~= "string" or name == "" or name:find("/", 1, true) then
    error("bad unit name: " .. tostring(name), 3)
  end
  if not name:find("%.%a+$") then name = name .. ".service" end
  return name
end

-- Quote one argument for ExecStart= (systemd.service(5) "COMMAND LINES"):
-- double quotes with C escapes; "%" is a specifier and "$" a variable otherwise.
function units.quote(arg)
  arg = tostring(arg)
  if arg == "" then return '""' end
  local s = arg:gsub("%%", "%%%%"):gsub("%$", "$$")
  if not s:find("[%s\"'\\;]") then return s end
  s = s:gsub("\\", "\\\\"):gsub('"', '\\"'):gsub("\n", "\\n"):gsub("\t", "\\t")
  return '"' .. s .. '"'
end

-- An ExecStart= value: a string as given, or an argv table quoted argument by argument.
local function command_line(exec)
  if type(exec) == "string" then return exec end
  if type(exec) ~= "table" or #exec == 0 then
    error("exec must be a string or a non-empty argv table", 3)
  end
  local out = {}
  for i, a in ipairs(exec) do out[i] = units.quote(a) end
  return table.concat(out, " ")
end

-- Append `extra` lines to lines: an array of "Key=Value" strings, and/or a map
-- Key -> value (a table value repeats the key), emitted in sorted key order.
local function add_extra(lines, extra, what)
  if extra == nil then return end
  if type(extra) ~= "table" then error(what .. " must be a table", 3) end
  for _, line in ipairs(extra) do lines[#lines + 1] = line end
  local keys = {}
  for k in pairs(extra) do
    if type(k) == "string" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = extra[k]
    if type(v) == "table" then
      for _, each in ipairs(v) do lines[#lines + 1] = k .. "=" .. tostring(each) end
    else
      lines[#lines + 1] = k .. "=" .. tostring(v)
    end
  end
end

-- The text of a unit file (see units.write for opts).
function units.render(name, opts)
  opts = opts or {}
  if opts.exec == nil then error("units.write: opts.exec is required", 2) end
  local lines = {
    "# written by spec/support/units.lua",
    "[Unit]",
    "Description=" .. (opts.description or ("rrengine fixture " .. name)),
    -- Specs restart units many times in a row: never hit the start limit.
    "StartLimitIntervalSec=0",
  }
  add_extra(lines, opts.extra_unit, "extra_unit")
  lines[#lines + 1] = ""
  lines[#lines + 1] = "[Service]"
  lines[#lines + 1] = "Type=" .. (opts.type or "simple")
  lines[#lines + 1] = "ExecStart=" .. command_line(opts.exec)
  if opts.reload then
    lines[#lines + 1] = "ExecReload=/bin/kill -HUP $MAINPID"
  end
  if opts.env_file then
    lines[#lines + 1] = "EnvironmentFile=" .. opts.env_file
  end
  -- There is no journald in the sandbox: keep the service's output in a file.
  local log = opts.log
  if log == nil then
    local sdir = os.getenv("RR_SANDBOX_DIR")
    if sdir and sdir ~= "" then log = sdir .. "/log/" .. name .. ".log" end
  end
  if log then
    mkdir_p(log:match("^(.*)/[^/]+$") or ".")
    lines[#lines + 1] = "StandardOutput=append:" .. log
    lines[#lines + 1] = "StandardError=inherit"
  end
  add_extra(lines, opts.extra_service, "extra_service")
  lines[#lines + 1] = ""
  return table.concat(lines, "\n")
end

-- Write a unit file into the sandbox unit directory; returns its path.
--   opts.exec          string (ExecStart= verbatim) or argv table (quoted for you)
--   opts.type          Type= (default "simple")
--   opts.reload        true: ExecReload=/bin/kill -HUP $MAINPID
--   opts.env_file      EnvironmentFile= path
--   opts.extra_unit    more [Unit] lines: { "Wants=a.service", After = { "a.service" } }
--   opts.extra_service more [Service] lines, same shapes
--   opts.description   Description=
--   opts.log           StandardOutput=append: path (default $RR_SANDBOX_DIR/log/NAME.log;
--                      false: leave output to systemd's default)
-- [Unit] always has StartLimitIntervalSec=0.
function units.write(name, opts)
  name = unit_name(name)
  local path = units.dir() .. "/" .. name
  write_atomic(path, units.render(name, opts))
  return path
end

-- Remove a unit file (and its drop-in directory's files); returns true if it existed.
function units.remove(name)
  name = unit_name(name)
  local path = units.dir() .. "/" .. name
  local existed = os.remove(path) ~= nil
  local dropins = path .. ".d"
  if lfs.attributes(dropins, "mode") == "directory" then
    for f in lfs.dir(dropins) do
      if f ~= "." and f ~= ".." then os.remove(dropins .. "/" .. f) end
    end
    os.remove(dropins)
  end
  return existed
end

-- Write a drop-in NAME.d/FILE.conf with the given [Service] (or other section) lines.
--   units.dropin("api.service", "env", { Service = { "Environment=X=1" } })
function units.dropin(name, file, sections)
  name = unit_name(name)
  local dir = units.dir() .. "/" .. name .. ".d"
  mkdir_p(dir)
  local lines = {}
  local keys = {}
  for k in pairs(sections) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, section in ipairs(keys) do
    lines[#lines + 1] = "[" .. section .. "]"
    add_extra(lines, sections[section], section)
  end
  lines[#lines + 1] = ""
  local path = dir .. "/" .. file .. (file:find("%.conf$") and "" or ".conf")
  write_atomic(path, table.concat(lines, "\n"))
  return path
end

-- fixture command-line options, from opts keys (snake_case) to flags.
local FIXTURE_OPTS = {
  { "host", "--host" }, { "status", "--status" }, { "warmup", "--warmup" },
  { "listen_delay", "--listen-delay" }, { "delay_ms", "--delay-ms" },
  { "exit_after", "--exit-after" }, { "exit_code", "--exit-code" }, { "body", "--body" },
  { "version_file", "--version-file" }, { "write_file", "--write-file" },
  { "control_file", "--control-file" }, { "big_body", "--big-body" },
  { "port_file", "--port-file" }, { "stop_delay", "--stop-delay" },
}

-- The argv of a fixture on port with opts (see units.fixture_unit).
function units.fixture_argv(port, opts)
  opts = opts or {}
  local argv = { units.fixture_bin, "--port", tostring(port) }
  for _, o in ipairs(FIXTURE_OPTS) do
    local v = opts[o[1]]
    if v ~= nil and v ~= false then
      argv[#argv + 1] = o[2]
      argv[#argv + 1] = tostring(v)
    end
  end
  if opts.hang then argv[#argv + 1] = "--hang" end
  if opts.notify or opts.type == "notify" then argv[#argv + 1] = "--notify" end
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = tostring(a) end
  return argv
end

-- Write a unit running the fixture on port. opts: the fixture's options in
-- snake_case (status, warmup, listen_delay, hang, delay_ms, exit_after, exit_code,
-- body, version_file, write_file, control_file, big_body, port_file, stop_delay, host, args),
-- type ("simple" default; "notify" adds --notify), reload (default true),
-- env_file, extra_unit, extra_service, log, description.
-- Returns the unit file's path and the health URL.
function units.fixture_unit(name, port, opts)
  opts = opts or {}
  local reload = opts.reload
  if reload == nil then reload = true end
  local path = units.write(name, {
    exec = units.fixture_argv(port, opts),
    type = opts.type or (opts.notify and "notify") or "simple",
    reload = reload,
    env_file = opts.env_file,
    extra_unit = opts.extra_unit,
    extra_service = opts.extra_service,
    log = opts.log,
    description = opts.description,
  })
  return path, string.format("http://%s:%d/health", opts.host or "127.0.0.1", port)
end

-- Write a fixture control file atomically: units.control(path, { status = 500 }).
-- An empty table or nil removes the file (no overrides).
function units.control(path, settings)
  if settings == nil or next(settings) == nil then
    os.remove(path)
    return
  end
  local keys = {}
  for k in pairs(settings) do keys[#keys + 1] = k end
  table.sort(keys)
  local lines = {}
  for _, k in ipairs(keys) do
    local v = settings[k]
    if v == true then v = 1 elseif v == false then v = 0 end
    lines[#lines + 1] = k .. "=" .. tostring(v)
  end
  write_atomic(path, table.concat(lines, "\n") .. "\n")
end

-- Ports. Lua cannot bind a socket to try one, so:
--  * candidates run through 20000-29999, below the kernel's ephemeral range
--    (32768-60999 here), so outgoing connections never take a fixture's port;
--  * each process starts at an offset derived from the sandbox manager's PID
--    ($RR_SANDBOX_PID; else its own), so concurrent sandboxes start apart;
--  * a port that /proc/net/tcp{,6} shows in any state (listening, connected,
--    TIME_WAIT) is skipped;
--  * a port handed out is reserved with an fcntl lock on
--    /tmp/rrengine-ports/<port>.lock, held until this process exits, so two
--    processes (two sandboxes, two busted runs) never get the same port.
local PORT_FIRST, PORT_COUNT = 20000, 10000
local PORT_LOCK_DIR = "/tmp/rrengine-ports"
local port_cursor        -- next offset to try
local port_locks = {}    -- port -> open lock file (kept open: the lock lives with it)

local function self_pid()
  local f = io.open("/proc/self/stat", "r")
  if not f then return 0 end
  local pid = tonumber((f:read("l") or ""):match("^(%d+)"))
  f:close()
  return pid or 0
end

-- Ports with a socket in /proc/net/tcp and tcp6.
local function ports_in_use()
  local used = {}
  for _, file in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
    local f = io.open(file, "r")
    if f then
      for line in f:lines() do
        local hex = line:match("^%s*%d+:%s+%x+:(%x+)%s")
        if hex then used[tonumber(hex, 16)] = true end
      end
      f:close()
    end
  end
  return used
end

-- Take port's lock file; true when this process now holds it.
local function reserve(port)
  local path = PORT_LOCK_DIR .. "/" .. port .. ".lock"
  local f = io.open(path, "a")
  if not f then return false end
  if not lfs.lock(f, "w") then
    f:close()
    return false
  end
  port_locks[port] = f
  return true
end

-- A TCP port on 127.0.0.1 that nothing uses now, that no other process using
-- this function holds, and that this process has not handed out before.
function units.free_port()
  if not port_cursor then
    local seed = tonumber(os.getenv("RR_SANDBOX_PID") or "") or self_pid()
    -- Spread by 97 (prime to the range) so PIDs 1 apart start 97 ports apart.
    port_cursor = (seed * 97) % PORT_COUNT
  end
  mkdir_p(PORT_LOCK_DIR)
  local used = ports_in_use()
  for _ = 1, PORT_COUNT do
    local port = PORT_FIRST + port_cursor
    port_cursor = (port_cursor + 1) % PORT_COUNT
    if not used[port] and not port_locks[port] and reserve(port) then return port end
  end
  error("units.free_port: no free port in " .. PORT_FIRST .. "-" .. (PORT_FIRST + PORT_COUNT - 1), 2)
end

return units
