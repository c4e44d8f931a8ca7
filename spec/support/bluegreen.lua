-- spec/support/bluegreen.lua: a blue-green service for the specs: one template unit of the
-- sandboxed user manager (PREFIX-web@.service) whose two instances, @blue and @green, run the
-- fixture on their own port with their own working dir, behind a real HAProxy (one server per
-- colour).
--
--   local bgp = require("spec.support.bluegreen")
--   local s = bgp.new({ soak = 2 })       -- units written, blue started and in rotation, green drained
--   s:cli({ "--deploy", "--deploy-path", dir })     -- plans/rolling.lua as an operator runs it
--   s:teardown()
--
-- The instances read everything from their instance name (%i): the port from DIR/%i.port, the
-- version from DIR/code/%i/version, the control file from DIR/code/%i/app.control (a release
-- can ship one). The template file is the whole definition, the same for both colours.
local rr = require("rr")
local fs = require("rr.fs")
local http = require("rr.http")
local haproxy = require("rr.haproxy")
local units = require("spec.support.units")
local helpers = require("spec.support.helpers")
local hx = require("spec.support.haproxy")
local platform = require("spec.support.platform")

local bgp = {}
bgp.__index = bgp

local counter = 0

bgp.BACKEND = "web"

-- bgp.new(opts) -> s. opts: soak (2), drain_timeout (5), stabilize (0.3), analysis (path),
-- delay_ms (20: requests in flight at every switch), start = { "blue" } (the colours started).
function bgp.new(opts)
  opts = opts or {}
  counter = counter + 1
  local self = setmetatable({ opts = opts }, bgp)
  self.p = platform.new({}, {}) -- a directory, a state root and an event log: no service of its own
  self.dir = self.p.dir
  self.name = "web"
  self.template = ("rrbg%d-%d-web@.service"):format(fs.getpid(), counter)
  self.colours = {}
  for _, colour in ipairs({ "blue", "green" }) do
    local c = { colour = colour, port = units.free_port(), working_dir = self.dir .. "/code/" .. colour,
      unit = self.template:gsub("@%.service$", "@" .. colour .. ".service"), server = "web_" .. colour }
    c.url = ("http://127.0.0.1:%d/health"):format(c.port)
    helpers.write(self.dir .. "/" .. colour .. ".port", tostring(c.port) .. "\n")
    helpers.write(c.working_dir .. "/version", "v1-" .. colour .. "\n")
    helpers.write(c.working_dir .. "/app.lua", "return 'old code'\n")
    self.colours[colour] = c
  end
  -- there is no journald in the sandbox: the instances' output goes to a file (as units.lua's)
  local sandbox_log = os.getenv("RR_SANDBOX_DIR")
  if sandbox_log == "" then sandbox_log = nil end
  if sandbox_log then assert(fs.mkdir_p(sandbox_log .. "/log", 493)) end
  local exec = ("/bin/sh -c 'exec %s --host 127.0.0.1 --port \"$$(cat %s/%%i.port)\" --version-file %s/code/%%i/version "
    .. "--control-file %s/code/%%i/app.control --delay-ms %d'"):format(units.fixture_bin, self.dir, self.dir, self.dir,
    opts.delay_ms or 20)
  local text = table.concat({
    "# written by spec/support/bluegreen.lua",
    "[Unit]",
    "Description=rrengine blue-green fixture %i",
    "StartLimitIntervalSec=0",
    "",
    "[Service]",
    "Type=simple",
    "ExecStart=" .. exec,
    sandbox_log and ("StandardOutput=append:%s/log/%s.log"):format(sandbox_log, self.template) or "",
    "",
  }, "\n")
  self.template_path = helpers.write(units.dir() .. "/" .. self.template, text)
  local m = platform.manager()
  assert(m:daemon_reload())
  for _, colour in ipairs(opts.start or { "blue" }) do self:start(colour) end
  local servers = {}
  for _, colour in ipairs({ "blue", "green" }) do
    servers[#servers + 1] = { name = self.colours[colour].server, port = self.colours[colour].port }
  end
  self.h = hx.start({ servers = servers, backend = bgp.BACKEND })
  self.hp = assert(haproxy.new({ socket = self.h.socket, backend = bgp.BACKEND }))
  -- the idle colour takes no traffic
  for _, colour in ipairs({ "blue", "green" }) do
    local started = false
    for _, c in ipairs(opts.start or { "blue" }) do if c == colour then started = true end end
    if not started then assert(self.hp:drain(self.colours[colour].server)) end
  end
  self.services_file = self:write_services()
  return self
end

-- The services file (opts override the blue_green fields; `extra` adds service fields).
function bgp:write_services(over, path)
  over = over or {}
  local o = self.opts
  local bg = {
    blue = { working_dir = self.colours.blue.working_dir, health = { url = self.colours.blue.url },
      balancer_server = self.colours.blue.server },
    green = { working_dir = self.colours.green.working_dir, health = { url = self.colours.green.url },
      balancer_server = self.colours.green.server },
    balancer = { haproxy = self.h.socket, backend = bgp.BACKEND },
    soak = o.soak or 2, drain_timeout = o.drain_timeout or 5, analysis = o.analysis,
  }
  for k, v in pairs(over.blue_green or {}) do bg[k] = v end
  local svc = { name = self.name, unit = self.template, stabilize = o.stabilize or 0.3, blue_green = bg }
  for k, v in pairs(over.service or {}) do svc[k] = v end
  local tbl = { defaults = { health = { timeout = 5, retries = 1, interval = 0.2 }, stabilize = 0 }, services = { svc } }
  path = path or (self.dir .. "/services.lua")
  helpers.write(path, "return " .. platform.serialize(tbl) .. "\n")
  return path
end

function bgp:unit(colour)
  return platform.manager():unit(self.colours[colour].unit)
end

-- Starts a colour and waits until it answers healthy.
function bgp:start(colour)
  local u = self:unit(colour)
  u:reset_failed()
  assert(u:start("replace"))
  local ok, why = require("rr.health").check(u, { kind = "http", url = self.colours[colour].url, timeout = 10,
    retries = 3, interval = 0.2 })
  assert(ok, ("%s never became healthy: %s"):format(colour, tostring(why)))
end

function bgp:active(colour)
  return self:unit(colour):get("ActiveState")
end

-- The version a colour's process serves (its /health body), or nil when it does not answer.
function bgp:running(colour)
  local res = http.get(self.colours[colour].url, { timeout = 2 })
  return res and res.body:match("version=(%S+)")
end

function bgp:on_disk(colour)
  return (assert(fs.read(self.colours[colour].working_dir .. "/version")):gsub("\n$", ""))
end

-- The admin state of a colour's server at HAProxy.
function bgp:admin(colour)
  return assert(self.hp:state(self.colours[colour].server)).admin
end

-- The live colour the engine recorded, or nil.
function bgp:live()
  local text = fs.read(self.p.state_root .. "/bluegreen/" .. self.name .. ".live")
  return text and text:match("^(%a+)")
end

-- A digest of a directory tree: every file's path and SHA-256, sorted (what "byte-identical" means).
function bgp.tree(dir)
  local out = {}
  local function walk(d, rel)
    for _, name in ipairs(fs.list(d) or {}) do
      local path, r = d .. "/" .. name, rel == "" and name or (rel .. "/" .. name)
      local st = fs.stat(path)
      if st and st.type == "dir" then
        walk(path, r)
      elseif st then
        out[#out + 1] = r .. " " .. tostring(fs.sha256(path))
      end
    end
  end
  walk(dir, "")
  table.sort(out)
  return table.concat(out, "\n")
end

-- plans/rolling.lua through the command line (platform:cli's options), with this services file.
function bgp:cli(args, opts)
  opts = opts or {}
  opts.services_file = opts.services_file or self.services_file
  return self.p:cli(args, opts)
end

-- A release directory holding `version` (unique per call) and the given files.
function bgp:release(name, files)
  self.releases = (self.releases or 0) + 1
  local version = ("%s-%d"):format(name, self.releases)
  local dir = ("%s/releases/%s"):format(self.dir, version)
  helpers.write(dir .. "/version", version .. "\n")
  for rel, text in pairs(files or {}) do helpers.write(dir .. "/" .. rel, text) end
  return dir, version
end

function bgp:teardown()
  if self.h then self.h:stop() end
  local m = platform.manager()
  for _, colour in ipairs({ "blue", "green" }) do
    local u = m:unit(self.colours[colour].unit)
    if u then u:stop("replace") end
  end
  os.remove(self.template_path)
  m:daemon_reload()
  self.p:teardown()
end

-- wrk through HAProxy for as long as it takes (stopped by load.stop() -> wrk's counts), started
-- only once its requests reach a server (HAProxy's own counters say so).
function bgp:load(path)
  return hx.load(self.hp, ("http://127.0.0.1:%d%s"):format(self.h.port, path or "/app"))
end

-- HAProxy's admin state of a colour's server every ~20 ms until w.stop(): w.seen[admin] = true
-- for every state seen.
function bgp:watch(colour)
  local w = { seen = {} }
  return hx.sample(w, function() w.seen[self:admin(colour)] = true end)
end

return bgp
