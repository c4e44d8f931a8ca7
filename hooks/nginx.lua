-- Example balancer script: a replica group behind nginx (named by `balancer = "hooks/nginx.lua"`
-- in a group of services.lua). An example to adapt, not a supported integration.
--
-- nginx has no runtime API in its free version: the script rewrites an upstream block that the
-- nginx configuration includes, with the drained member marked `down`, checks it with `nginx -t`
-- and reloads nginx (`nginx -s reload`). A reload is graceful: the old workers finish the
-- requests they have, new requests no longer go to the member. nginx does not say when the old
-- workers are done, so this script has no sessions(): rrengine waits the group's whole
-- `drain_timeout` after drain() before it stops the member.
--
-- In nginx.conf (inside http {}):   include /etc/nginx/conf.d/sso_api.upstream;
-- and proxy_pass http://sso_api; in the server block. Edit SETTINGS below (or set
-- RR_NGINX_INCLUDE, RR_NGINX_UPSTREAM, RR_NGINX_BIN and RR_NGINX_SERVERS="name=addr,name=addr").
local proc = require("rr.proc")
local fs = require("rr.fs")

local SETTINGS = {
  upstream = "sso_api",
  include = "/etc/nginx/conf.d/sso_api.upstream",
  nginx = "nginx",
  -- balancer server name (a member's balancer_server, or its service name) -> address
  servers = {
    ["sso.api.1"] = "127.0.0.1:3101",
    ["sso.api.2"] = "127.0.0.1:3102",
    ["sso.api.3"] = "127.0.0.1:3103",
  },
}

local function from_env()
  local s = SETTINGS
  s.include = os.getenv("RR_NGINX_INCLUDE") or s.include
  s.upstream = os.getenv("RR_NGINX_UPSTREAM") or s.upstream
  s.nginx = os.getenv("RR_NGINX_BIN") or s.nginx
  local list = os.getenv("RR_NGINX_SERVERS")
  if list then
    s.servers = {}
    for name, addr in list:gmatch("([^,=]+)=([^,]+)") do s.servers[name] = addr end
  end
end
from_env()

-- Members marked down, as the include file on disk says (a run that died keeps its word).
local down = {}
do
  local text = fs.read(SETTINGS.include)
  for name in (text or ""):gmatch("down; # ([^\n]+)") do down[name] = true end
end

local function server_of(member)
  return member.server or member.balancer_server or member.name
end

local function render()
  local names = {}
  for name in pairs(SETTINGS.servers) do names[#names + 1] = name end
  table.sort(names)
  local lines = { "# written by rrengine (hooks/nginx.lua): do not edit while a run is in progress",
                  "upstream " .. SETTINGS.upstream .. " {" }
  for _, name in ipairs(names) do
    lines[#lines + 1] = ("    server %s%s; # %s"):format(SETTINGS.servers[name], down[name] and " down" or "", name)
  end
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n"
end

-- Writes the include, has nginx check the whole configuration, reloads. On any failure the
-- previous include is put back (nginx keeps running the old configuration).
local function apply()
  local old = fs.read(SETTINGS.include)
  local ok, err = fs.write_atomic(SETTINGS.include, render())
  if not ok then return nil, err end
  local res
  res, err = proc.run({ SETTINGS.nginx, "-t", "-q" }, { timeout = 30 })
  if res then res, err = proc.run({ SETTINGS.nginx, "-s", "reload" }, { timeout = 30 }) end
  if not res then
    if old then fs.write_atomic(SETTINGS.include, old) else fs.remove(SETTINGS.include) end
    return nil, "nginx: " .. tostring(err)
  end
  return true
end

local function set_down(member, value)
  local name = server_of(member)
  if not SETTINGS.servers[name] then
    return nil, ("no address for server %s in hooks/nginx.lua's SETTINGS.servers"):format(name)
  end
  local before = down[name]
  down[name] = value or nil
  local ok, err = apply()
  if not ok then down[name] = before end
  return ok, err
end

return {
  drain = function(member) return set_down(member, true) end,
  enable = function(member) return set_down(member, false) end,
  state = function(member)
    local name = server_of(member)
    if not SETTINGS.servers[name] then
      return nil, ("no address for server %s in hooks/nginx.lua's SETTINGS.servers"):format(name)
    end
    return { admin = down[name] and "drain" or "ready" }
  end,
}
