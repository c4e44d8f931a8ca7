-- rr.haproxy: HAProxy's runtime API on its admin socket (`stats socket PATH level admin`), through
-- rr.socket.
--
--   local hp = assert(require("rr.haproxy").new{ socket = "/run/haproxy/admin.sock", backend = "sso_api" })
--   assert(hp:drain("sso.api.1"))
--   assert(hp:wait_drained("sso.api.1", 30))    -- current sessions reached 0
--   ... restart, check ...
--   assert(hp:ready("sso.api.1"))
--
-- One connection per command: without `prompt`, HAProxy answers one command line and closes
-- the connection, so the answer is everything read until end of file. Every answer ends with an
-- empty line; a `set` command that worked answers nothing else, so any text is HAProxy's error.
-- The commands (HAProxy 2.6's doc/management.txt): `set server B/S state ready|drain|maint`,
-- `set weight B/S W`, `show stat -1 6 -1` (CSV, backends and servers), `show servers state B`.
local rr = require("rr")
local socket = require("rr.socket")

local haproxy = {}

local Haproxy = {}
Haproxy.__index = Haproxy

local DEFAULT_TIMEOUT = 5      -- seconds per command (connect, write, read)
local DEFAULT_INTERVAL = 0.1   -- seconds between two looks at the sessions while draining
local MAX_ANSWER = 16 * 1024 * 1024

-- HAProxy's server and backend names: letters, digits, '.', '-', '_', ':'. Checked before a name
-- goes into a command line, where a space, ';' or a newline would start another command.
local NAME = "^[%w%.%-_:]+$"

-- srv_admin_state bits (show servers state): forced, inherited, configured and resolution
-- maintenance; forced and inherited drain. 0x40 (FQDN set at run time) is no maintenance.
local ADMIN_MAINT = 0x01 | 0x02 | 0x04 | 0x20
local ADMIN_DRAIN = 0x08 | 0x10

local OP_STATES = { [0] = "stopped", [1] = "starting", [2] = "running", [3] = "stopping" }

-- HAProxy's one-line error answers and the codes they become.
local ERRORS = {
  { "^No such server", "ENOENT" },
  { "^No such backend", "ENOBACKEND" },
  { "^No such proxy", "ENOBACKEND" },
  { "^Permission denied", "EPERM" },
}

local function valid_name(s)
  return type(s) == "string" and s:match(NAME) ~= nil
end

-- socket.unix or socket.tcp for an address: "/path" or "HOST:PORT" ("[v6]:PORT").
local function parse_address(addr)
  if addr:sub(1, 1) == "/" then return { path = addr } end
  local host, port = addr:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = addr:match("^([^:]+):(%d+)$") end
  if host then return { host = host, port = tonumber(port) } end
  return nil
end

-- haproxy.new{ socket = PATH or "HOST:PORT", backend = NAME [, timeout = s] [, interval = s] }
-- -> hp | nil, message, "EINVAL"
function haproxy.new(opts)
  if type(opts) ~= "table" then error("haproxy.new: options table expected", 2) end
  if type(opts.socket) ~= "string" then error("haproxy.new: 'socket' must be a string", 2) end
  if type(opts.backend) ~= "string" then error("haproxy.new: 'backend' must be a string", 2) end
  for _, k in ipairs({ "timeout", "interval" }) do
    if opts[k] ~= nil and (type(opts[k]) ~= "number" or opts[k] <= 0) then
      error(("haproxy.new: '%s' must be a number of seconds > 0"):format(k), 2)
    end
  end
  local address = parse_address(opts.socket)
  if not address then
    return nil, ("HAProxy socket %q: expected an absolute path or HOST:PORT"):format(opts.socket), "EINVAL"
  end
  if not valid_name(opts.backend) then
    return nil, ("HAProxy backend %q: names are letters, digits, '.', '-', '_' and ':'"):format(opts.backend), "EINVAL"
  end
  return setmetatable({
    socket = opts.socket,
    backend = opts.backend,
    timeout = opts.timeout or DEFAULT_TIMEOUT,
    interval = opts.interval or DEFAULT_INTERVAL,
    address = address,
  }, Haproxy)
end

local function connect(self)
  local a = self.address
  if a.path then return socket.unix(a.path, { timeout = self.timeout }) end
  return socket.tcp(a.host, a.port, { timeout = self.timeout })
end

-- hp:command(line) -> answer | nil, message, code: one command line, HAProxy's whole answer
-- (its closing empty line removed). The socket's failures keep their codes (ENOENT: no socket at
-- that path; ECONNREFUSED: nobody listens; EACCES; ETIMEDOUT).
function Haproxy:command(line)
  if type(line) ~= "string" or line:find("[\r\n]") then
    error("hp:command: one command line expected", 2)
  end
  local c, err, code = connect(self)
  if not c then
    local hint = code == "ENOENT" and " (is HAProxy running, with `stats socket " .. self.socket .. " level admin`?)" or ""
    return nil, ("cannot reach HAProxy: %s%s"):format(err, hint), code
  end
  local ok
  ok, err, code = c:write(line .. "\n")
  local answer
  if ok then answer, err, code = c:read_all({ max = MAX_ANSWER }) end
  c:close()
  if not answer then return nil, ("HAProxy at %s: %s: %s"):format(self.socket, line, err), code end
  return (answer:gsub("\n\n$", "\n"))
end

-- A command that answers nothing when it worked. true | nil, message, code.
local function set_command(self, line)
  local answer, err, code = self:command(line)
  if not answer then return nil, err, code end
  local text = answer:gsub("%s+$", "")
  if text == "" then return true end
  local first = text:match("^[^\n]*")
  code = "EHAPROXY"
  for _, e in ipairs(ERRORS) do
    if first:match(e[1]) then code = e[2] break end
  end
  return nil, ("HAProxy at %s: %s: %s"):format(self.socket, line, first), code
end

local function check_server(server)
  if not valid_name(server) then
    return nil, ("HAProxy server %q: names are letters, digits, '.', '-', '_' and ':'"):format(tostring(server)), "EINVAL"
  end
  return true
end

local function set_state(self, server, state)
  local ok, err, code = check_server(server)
  if not ok then return nil, err, code end
  return set_command(self, ("set server %s/%s state %s"):format(self.backend, server, state))
end

-- hp:drain(server): out of load balancing; the sessions it has go on until they end.
function Haproxy:drain(server) return set_state(self, server, "drain") end
-- hp:ready(server): back in rotation (also out of maintenance).
function Haproxy:ready(server) return set_state(self, server, "ready") end
-- hp:maint(server): no traffic at all, health checks stopped.
function Haproxy:maint(server) return set_state(self, server, "maint") end

-- hp:set_weight(server, weight): an integer 0..256, or a string "N%" of the initial weight.
function Haproxy:set_weight(server, weight)
  local w
  if math.type(weight) == "integer" and weight >= 0 then
    w = tostring(weight)
  elseif type(weight) == "string" and weight:match("^%d+%%$") then
    w = weight
  else
    error("hp:set_weight: weight must be an integer >= 0 or a string \"N%\"", 2)
  end
  local ok, err, code = check_server(server)
  if not ok then return nil, err, code end
  return set_command(self, ("set weight %s/%s %s"):format(self.backend, server, w))
end

-- The fields of one CSV line; HAProxy quotes a field that holds a comma or a quote.
local function csv_fields(line)
  local fields, i, n = {}, 1, #line
  while i <= n + 1 do
    if line:sub(i, i) == '"' then
      local buf, j = {}, i + 1
      while j <= n do
        local ch = line:sub(j, j)
        if ch == '"' then
          if line:sub(j + 1, j + 1) == '"' then
            buf[#buf + 1] = '"'
            j = j + 2
          else
            j = j + 1
            break
          end
        else
          buf[#buf + 1] = ch
          j = j + 1
        end
      end
      fields[#fields + 1] = table.concat(buf)
      i = j + 1 -- past the comma
    else
      local comma = line:find(",", i, true) or n + 1
      fields[#fields + 1] = line:sub(i, comma - 1)
      i = comma + 1
    end
  end
  return fields
end
haproxy.csv_fields = csv_fields

-- The rows of a `show stat` answer as tables keyed by the header's names.
local function parse_stat(answer)
  local header, rows = nil, {}
  for line in answer:gmatch("[^\n]+") do
    if not header then
      if line:sub(1, 2) == "# " then header = csv_fields(line:sub(3)) end
    else
      local f, row = csv_fields(line), {}
      for i, name in ipairs(header) do row[name] = f[i] end
      rows[#rows + 1] = row
    end
  end
  return header and rows or nil
end
haproxy.parse_stat = parse_stat

-- The servers of a `show servers state` answer (format 1), keyed by name.
local function parse_servers_state(answer)
  local header, servers = nil, {}
  for line in answer:gmatch("[^\n]+") do
    if line:sub(1, 2) == "# " then
      header = {}
      for name in line:sub(3):gmatch("%S+") do header[#header + 1] = name end
    elseif header and line:sub(1, 1) ~= "#" then
      local row, i = {}, 0
      for v in line:gmatch("%S+") do
        i = i + 1
        if header[i] then row[header[i]] = v end
      end
      if row.srv_name then servers[row.srv_name] = row end
    end
  end
  return header and servers or nil
end
haproxy.parse_servers_state = parse_servers_state

local function admin_of(mask)
  if mask & ADMIN_MAINT ~= 0 then return "maint" end
  if mask & ADMIN_DRAIN ~= 0 then return "drain" end
  return "ready"
end

-- `show stat` rows: type 1 is a backend, 2 a server (0 a frontend, 3 a listener).
local TYPE_BACKEND, TYPE_SERVER = "1", "2"

-- Why `show stat -1 6 -1` and not `show stat BACKEND 4 -1`: HAProxy looks a proxy name up among
-- frontends and backends alike, so when a frontend has the backend's name the answer is the
-- frontend's (no server rows at all), and a drain wait would find nothing to wait for. The
-- backend and server rows of every proxy, filtered by pxname and type, are the backend's.
local STAT_LINE = "show stat -1 6 -1"

-- The traffic side of every server of the backend (one `show stat`): name -> { status =,
-- sessions =, queued =, weight =, total = } | nil, message, code ("ENOBACKEND": HAProxy has no
-- backend of that name; "ENOENT": the backend has no server).
function Haproxy:stats()
  local answer, err, code = self:command(STAT_LINE)
  if not answer then return nil, err, code end
  local rows = parse_stat(answer)
  if not rows then
    local first = answer:match("^[^\n]*")
    return nil, ("HAProxy at %s: %s: %s"):format(self.socket, STAT_LINE, first), "EHAPROXY"
  end
  local out, backend, servers = {}, false, 0
  for _, r in ipairs(rows) do
    if r.pxname == self.backend then
      if r.type == TYPE_BACKEND then
        backend = true
      elseif r.type == TYPE_SERVER then
        servers = servers + 1
        out[r.svname] = {
          name = r.svname,
          status = r.status,
          sessions = tonumber(r.scur) or 0,
          queued = tonumber(r.qcur) or 0,
          weight = tonumber(r.weight),
          total = tonumber(r.stot) or 0,
          check = r.check_status ~= "" and r.check_status or nil,
        }
      end
    end
  end
  if not backend then
    return nil, ("HAProxy at %s: no backend %s"):format(self.socket, self.backend), "ENOBACKEND"
  end
  if servers == 0 then
    return nil, ("HAProxy at %s: backend %s has no servers"):format(self.socket, self.backend), "ENOENT"
  end
  return out
end

-- hp:servers() -> name -> state (see hp:state) for every server of the backend.
function Haproxy:servers()
  local stats, err, code = self:stats()
  if not stats then return nil, err, code end
  local line = "show servers state " .. self.backend
  local answer
  answer, err, code = self:command(line)
  if not answer then return nil, err, code end
  local admin = parse_servers_state(answer)
  if not admin then
    return nil, ("HAProxy at %s: %s: %s"):format(self.socket, line, answer:match("^[^\n]*")), "EHAPROXY"
  end
  for name, s in pairs(stats) do
    local a = admin[name]
    if a then
      local mask = tonumber(a.srv_admin_state) or 0
      s.admin = admin_of(mask)
      s.admin_state = mask
      s.operational = OP_STATES[tonumber(a.srv_op_state)] or a.srv_op_state
      s.initial_weight = tonumber(a.srv_iweight)
      s.user_weight = tonumber(a.srv_uweight)
    end
  end
  return stats
end

-- hp:state(server) -> { name =, admin = "ready"|"drain"|"maint", status = "UP"|"DRAIN"|"MAINT"|
-- "DOWN"|..., sessions =, queued =, weight =, initial_weight =, total =, operational = } |
-- nil, message, code ("ENOENT": the backend has no such server, or no server at all;
-- "ENOBACKEND": HAProxy has no such backend). weight is the effective one (0 while drained),
-- user_weight the one `set weight` gave (srv_uweight), initial_weight the configured one.
function Haproxy:state(server)
  local ok, err, code = check_server(server)
  if not ok then return nil, err, code end
  local all
  all, err, code = self:servers()
  if not all then return nil, err, code end
  local s = all[server]
  if not s then
    return nil, ("HAProxy at %s: backend %s has no server %s"):format(self.socket, self.backend, server), "ENOENT"
  end
  return s
end

-- hp:wait_drained(server, timeout [, interval]) -> true, stats | nil, message, "ETIMEDOUT", stats |
-- nil, message, "ENOENT" (no such server: nothing to wait for is no drained server) | nil, message, code:
-- waits until the server has no current session and nothing queued. HAProxy does not say when
-- that happens: `show stat` is read every `interval` seconds (hp.interval, 0.1 by default).
function Haproxy:wait_drained(server, timeout, interval)
  if type(timeout) ~= "number" or timeout < 0 then error("hp:wait_drained: timeout in seconds expected", 2) end
  interval = interval or self.interval
  local ok, err, code = check_server(server)
  if not ok then return nil, err, code end
  local deadline = rr.now() + timeout
  while true do
    local all
    all, err, code = self:stats()
    if not all then return nil, err, code end
    local s = all[server]
    if not s then
      return nil, ("HAProxy at %s: backend %s has no server %s"):format(self.socket, self.backend, server), "ENOENT"
    end
    if s.sessions == 0 and s.queued == 0 then return true, s end
    local left = deadline - rr.now()
    if left <= 0 then
      return nil, ("%s/%s still has %d session(s) and %d queued after %g s"):format(self.backend, server, s.sessions,
        s.queued, timeout), "ETIMEDOUT", s
    end
    rr.sleep(math.min(interval, left))
  end
end

return haproxy
