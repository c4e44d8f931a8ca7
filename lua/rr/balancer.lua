-- rr.balancer: one interface over the load balancer in front of a replica group, for the
-- scheduler's drain / restart / enable cycle: HAProxy built in (its runtime API, rr.haproxy), any
-- other balancer as a Lua script.
--
--   local b = assert(balancer.open(group, services_dir))   -- a group of the services file
--   local member = { name = "sso.api.1", server = "sso.api.1" }
--   local st = assert(b:state(member))          -- pre-check: st.admin == "maint" is reported
--   assert(b:drain(member))
--   assert(b:wait_drained(member, group.drain_timeout or 30))
--   ... restart, post-check ...
--   assert(b:enable(member))
--
-- A canary serves at a weight of its own while it soaks: `b:enable(member)` with member.weight
-- set sets that weight before the member goes back in rotation, and remembers the weight it had;
-- `b:restore_weight(member)` gives that weight back (the canary passed, or it was rolled back).
--
-- A group's `balancer` is either { haproxy = SOCKET, backend = NAME } or the path of a script
-- (relative to the services file's directory) returning
--   { drain = fn(member), enable = fn(member)            -- true | nil/false, message
--     [, sessions = fn(member)]                          -- number | nil, message
--     [, state = fn(member)]                             -- { admin =, ... } | nil, message
--     [, wait_drained = fn(member, timeout)]             -- true | nil, message
--     [, weight = fn(member, w)] }                         -- the weight it had | nil, message
-- weight(member, w) sets the member's weight (w as the services file's canary.weight says: a
-- number, or "N%" of its configured weight) and returns the one it had, which is given back
-- to weight(member, previous) to restore it.
-- A member is { name = service name, server = balancer_server or the service name }.
local rr = require("rr")
local haproxy = require("rr.haproxy")

local balancer = {}

local DRAIN_POLL = 0.1 -- seconds between two sessions() calls of a script balancer

local Haproxy = {}
Haproxy.__index = Haproxy

local Script = {}
Script.__index = Script

-- The balancer's name for a member: its `server`, else `balancer_server`, else its name.
function balancer.server_of(member)
  if type(member) ~= "table" then error("balancer: member table expected", 3) end
  local s = member.server or member.balancer_server or member.name
  if type(s) ~= "string" then error("balancer: member needs a name", 3) end
  return s
end
local server_of = balancer.server_of

-- A member in maintenance was taken out by someone else (an operator, a broken host): it is
-- reported, and never drained and enabled again, which would put it back in rotation.
local function refuse_maint(self, member, st)
  return nil, ("%s: %s is in maintenance on %s (set outside this run): not touching it"):format(member.name or
    server_of(member), server_of(member), self:describe()), "EMAINT", st
end

-- ---- HAProxy ----

function Haproxy:describe()
  return ("HAProxy %s backend %s"):format(self.hp.socket, self.hp.backend)
end

-- b:state(member) -> { admin = "ready"|"drain"|"maint", status =, sessions =, weight =, ... }
function Haproxy:state(member)
  return self.hp:state(server_of(member))
end

-- b:drain(member) -> true | nil, message, code ("EMAINT": in maintenance, left alone)
function Haproxy:drain(member)
  local server = server_of(member)
  local st, err, code = self.hp:state(server)
  if not st then return nil, err, code end
  if st.admin == "maint" then return refuse_maint(self, member, st) end
  return self.hp:drain(server)
end

-- The weight a member had before set_weight, per server, until restore_weight (one balancer
-- object per group and run: a canary's weight is restored by the run that set it).
local function saved_of(self)
  self.saved = self.saved or {}
  return self.saved
end

-- b:set_weight(member, w) -> previous | nil, message, code: w an integer 0..256 or "N%" of the
-- server's configured weight. The weight it had (its user weight: 0 while drained is not it) is
-- kept for restore_weight, the first time only.
function Haproxy:set_weight(member, w)
  local server = server_of(member)
  local saved = saved_of(self)
  local pct = type(w) == "string" and tonumber(w:match("^(%d+)%%$"))
  if saved[server] == nil or pct then
    local st, err, code = self.hp:state(server)
    if not st then return nil, err, code end
    -- HAProxy rounds "N%" of the configured weight down: of a weight 1, anything below 100% is 0
    if pct and pct > 0 and st.initial_weight and st.initial_weight * pct // 100 == 0 then
      return nil, ("%s of %s's configured weight %d is 0: it would get no traffic (configure the servers with "
        .. "a larger weight, e.g. `weight 100`, or give a number)"):format(w, server, st.initial_weight), "EINVAL"
    end
    if saved[server] == nil then saved[server] = st.user_weight or st.initial_weight or st.weight end
  end
  local ok, err, code = self.hp:set_weight(server, w)
  if not ok then return nil, err, code end
  return saved[server]
end

-- b:restore_weight(member) -> true, weight | true (nothing to restore) | nil, message, code
function Haproxy:restore_weight(member)
  local server = server_of(member)
  local saved = saved_of(self)
  local w = saved[server]
  if w == nil then return true end
  local ok, err, code = self.hp:set_weight(server, w)
  if not ok then return nil, err, code end
  saved[server] = nil
  return true, w
end

-- b:enable(member) -> true | nil, message, code: with member.weight, that weight first, so that
-- the member never serves at its full weight on the way.
function Haproxy:enable(member)
  if member.weight ~= nil then
    local ok, err, code = self:set_weight(member, member.weight)
    if not ok then return nil, err, code end
  end
  return self.hp:ready(server_of(member))
end

function Haproxy:can_weight() return true end

-- b:wait_drained(member, timeout) -> true | nil, message, "ETIMEDOUT"
function Haproxy:wait_drained(member, timeout)
  return self.hp:wait_drained(server_of(member), timeout)
end

-- ---- a Lua script ----

function Script:describe()
  return "balancer script " .. self.path
end

-- Calls the script's fn; a raise, nil or false becomes nil, message, "EBALANCER".
function Script:call(name, member, ...)
  local ok, a, b = pcall(self.script[name], member, ...)
  if not ok then
    return nil, ("%s: %s(%s) raised: %s"):format(self.path, name, server_of(member), tostring(a)), "EBALANCER"
  end
  if a == nil or a == false then
    return nil, ("%s: %s(%s) failed: %s"):format(self.path, name, server_of(member), tostring(b or "no reason given")),
      "EBALANCER"
  end
  return a
end

function Script:state(member)
  if self.script.state then
    local st, err, code = self:call("state", member)
    if not st then return nil, err, code end
    if type(st) ~= "table" then
      return nil, ("%s: state(%s) returned a %s, not a table"):format(self.path, server_of(member), type(st)), "EBALANCER"
    end
    return st
  end
  local st = { admin = "unknown" }
  if self.script.sessions then
    local n, err, code = self:call("sessions", member)
    if not n then return nil, err, code end
    st.sessions = n
  end
  return st
end

function Script:drain(member)
  if self.script.state then
    local st, err, code = self:state(member)
    if not st then return nil, err, code end
    if st.admin == "maint" then return refuse_maint(self, member, st) end
  end
  local ok, err, code = self:call("drain", member)
  if not ok then return nil, err, code end
  return true
end

function Script:can_weight() return self.script.weight ~= nil end

function Script:set_weight(member, w)
  if not self.script.weight then
    return nil, ("%s has no weight(member, w) function"):format(self.path), "EBALANCER"
  end
  local server = server_of(member)
  local saved = saved_of(self)
  local previous, err, code = self:call("weight", member, w)
  if not previous then return nil, err, code end
  if saved[server] == nil then saved[server] = previous end
  return saved[server]
end

function Script:restore_weight(member)
  local server = server_of(member)
  local saved = saved_of(self)
  local w = saved[server]
  if w == nil then return true end
  local ok, err, code = self:call("weight", member, w)
  if not ok then return nil, err, code end
  saved[server] = nil
  return true, w
end

function Script:enable(member)
  if member.weight ~= nil then
    local ok, err, code = self:set_weight(member, member.weight)
    if not ok then return nil, err, code end
  end
  local ok, err, code = self:call("enable", member)
  if not ok then return nil, err, code end
  return true
end

-- Without wait_drained or sessions nothing tells when the last request ended: the whole
-- timeout (the group's drain_timeout) is waited.
function Script:wait_drained(member, timeout)
  if type(timeout) ~= "number" or timeout < 0 then error("b:wait_drained: timeout in seconds expected", 2) end
  if self.script.wait_drained then
    local ok, err, code = self:call("wait_drained", member, timeout)
    if not ok then return nil, err, code end
    return true
  end
  if not self.script.sessions then
    rr.sleep(timeout)
    return true
  end
  local deadline = rr.now() + timeout
  while true do
    local n, err, code = self:call("sessions", member)
    if not n then return nil, err, code end
    if type(n) ~= "number" then
      return nil, ("%s: sessions(%s) returned a %s, not a number"):format(self.path, server_of(member), type(n)), "EBALANCER"
    end
    if n <= 0 then return true end
    local left = deadline - rr.now()
    if left <= 0 then
      return nil, ("%s still has %d session(s) after %g s (%s)"):format(server_of(member), n, timeout, self.path),
        "ETIMEDOUT"
    end
    rr.sleep(math.min(DRAIN_POLL, left))
  end
end

local function load_script(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then
    local f = io.open(path)
    if not f then return nil, ("balancer script %s: no such file"):format(path), "ENOENT" end
    f:close()
    return nil, ("balancer script %s: %s"):format(path, err), "EINVAL"
  end
  local ok, script = pcall(chunk)
  if not ok then return nil, ("balancer script %s raised: %s"):format(path, tostring(script)), "EINVAL" end
  if type(script) ~= "table" then
    return nil, ("balancer script %s must return a table, not a %s"):format(path, type(script)), "EINVAL"
  end
  for _, name in ipairs({ "drain", "enable" }) do
    if type(script[name]) ~= "function" then
      return nil, ("balancer script %s has no %s(member) function"):format(path, name), "EINVAL"
    end
  end
  for _, name in ipairs({ "sessions", "state", "wait_drained", "weight" }) do
    if script[name] ~= nil and type(script[name]) ~= "function" then
      return nil, ("balancer script %s: %s must be a function"):format(path, name), "EINVAL"
    end
  end
  return script
end

-- balancer.open(group, base_dir) -> b | nil, message, code. group.balancer is
-- { haproxy = SOCKET, backend = NAME [, timeout =] [, interval =] } or a script path (relative
-- paths from base_dir). b.kind is "haproxy" or "script".
function balancer.open(group, base_dir)
  if type(group) ~= "table" then error("balancer.open: group table expected", 2) end
  local spec = group.balancer
  if type(spec) == "table" then
    if type(spec.haproxy) ~= "string" or type(spec.backend) ~= "string" then
      return nil, "balancer: expected { haproxy = SOCKET, backend = NAME }", "EINVAL"
    end
    for k in pairs(spec) do
      if k ~= "haproxy" and k ~= "backend" and k ~= "timeout" and k ~= "interval" then
        return nil, ("balancer: unknown field %q (haproxy, backend, timeout, interval)"):format(tostring(k)), "EINVAL"
      end
    end
    local hp, err, code = haproxy.new({ socket = spec.haproxy, backend = spec.backend, timeout = spec.timeout,
                                        interval = spec.interval })
    if not hp then return nil, err, code end
    return setmetatable({ kind = "haproxy", hp = hp }, Haproxy)
  elseif type(spec) == "string" then
    local path = spec
    if path:sub(1, 1) ~= "/" and base_dir then path = base_dir .. "/" .. path end
    local script, err, code = load_script(path)
    if not script then return nil, err, code end
    return setmetatable({ kind = "script", path = path, script = script }, Script)
  end
  return nil, "balancer: expected { haproxy = SOCKET, backend = NAME } or the path of a Lua script", "EINVAL"
end

return balancer
