-- spec/support/hosts.lua: test hosts for the specs of remote managers and remote commands.
--
--   local hosts = require("spec.support.hosts")
--   local hs = hosts.start(2)          -- { h1, h2 }, each:
--   -- h.name       the ssh alias ("h1"), in h.ssh_config
--   -- h.ssh_config the ssh client config every host of this start() shares (pass it as ssh -F,
--   --              or as ssh_config = to rr.systemd.remote and rr.remote)
--   -- h.dir, h.env the host's directory and its sandbox's variables (XDG_RUNTIME_DIR, ...)
--   -- h.unit_dir   where its user manager reads unit files
--   -- h.port, h.sshd_pid, h.manager_pid
--   h:write_unit("x.service", { exec = { "/bin/sleep", "1000" } })   -- units.render's opts
--   h:kill()                            -- the host drops: its sshd and its manager die
--   h:freeze(), h:thaw()                -- the host stops answering (sshd stopped), and again
--   hosts.stop(hs)                      -- every host stopped and cleaned up (idempotent)
--
-- A test host is a sandboxed user manager (spec/support/sandbox start DIR) plus its own sshd
-- (Debian's openssh-server, `/usr/sbin/sshd -D -e -f CONFIG` under rr.proc) listening on
-- 127.0.0.1 on a port of its own, with a host key and an authorized key made for the test. The
-- sshd's `SetEnv` hands every session that sandbox's XDG_RUNTIME_DIR, DBUS_SESSION_BUS_ADDRESS
-- and XDG_STATE_HOME, so `ssh h1 CMD` reaches h1's manager and keeps its state in h1's own
-- directory: one machine, several hosts. Root only (the sandbox and sshd need it).
--
-- Killing a host: sshd forks a process per connection, in a session of its own, whose children
-- are the remote commands (systemd-stdio-bridge, a lock holder): killing the listener alone
-- would leave every open connection working. kill() stops the listener (no new connection),
-- stops every process below it, level by level (a stopped process forks nothing more), then
-- kills them all and the manager, each by its PID. The client side sees its connections close,
-- as when a machine goes down.
local proc = require("rr.proc")
local fs = require("rr.fs")
local rr = require("rr")
local units = require("spec.support.units")

local hosts = {}

local SSHD = "/usr/sbin/sshd"
hosts.sandbox = units.root .. "/spec/support/sandbox"

-- Spawn argv (rr.proc.spawn's opts, on_line taken) and wait until one of its output lines matches
-- pattern, at most timeout seconds: the line is the signal, not a time. Returns the process
-- handle and the pattern's captures; raises with what it printed when it exits first or never
-- prints the line.
function hosts.spawn_until(argv, pattern, timeout, opts)
  local lines, found = {}, nil
  local gate = rr.spawn(function() rr.sleep(timeout) end)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.capture = false
  o.on_line = function(_, line)
    if #lines < 200 then lines[#lines + 1] = line end
    if not found then
      local caps = table.pack(line:match(pattern))
      if caps[1] ~= nil then
        found = caps
        gate:cancel()
      end
    end
  end
  local p, err = proc.spawn(argv, o)
  if not p then
    gate:cancel()
    error(("cannot start %s: %s"):format(argv[1], err), 2)
  end
  local exited = rr.spawn(function() return p:wait() end)
  rr.wait_any(gate, exited)
  gate:cancel()
  exited:cancel()
  if not found then
    p:close()
    error(("%s did not print %q within %g s:\n%s"):format(table.concat(argv, " "), pattern, timeout,
      table.concat(lines, "\n")), 2)
  end
  return p, found
end
local spawn_until = hosts.spawn_until

-- Run argv; raise with its output when it fails.
local function run(argv, what, opts)
  local res, err, _, r = proc.run(argv, opts or { timeout = 30 })
  if not res then
    local out = r and (r.stderr .. r.stdout) or ""
    error(("%s: %s\n%s"):format(what, err, out), 3)
  end
  return res
end

-- The user we are (sshd logs in as that user: root, as the sandbox needs).
local function user_name()
  local res = run({ "id", "-un" }, "id -un")
  return (res.stdout:gsub("%s+$", ""))
end

-- The PIDs of pid's children (every thread's list), or {} once it is gone.
local function children(pid)
  local out = {}
  local dir = "/proc/" .. pid .. "/task"
  local tasks = fs.list(dir) or {}
  for _, tid in ipairs(tasks) do
    local c = io.open(dir .. "/" .. tid .. "/children", "r")
    if c then
      for child in (c:read("a") or ""):gmatch("%d+") do out[#out + 1] = child end
      c:close()
    end
  end
  return out
end

-- Send sig to the PIDs (strings), ignoring those already gone.
local function signal(sig, pids)
  if #pids == 0 then return end
  local argv = { "kill", "-" .. sig }
  for _, p in ipairs(pids) do argv[#argv + 1] = p end
  proc.run(argv, { timeout = 10 })
end

-- Stop pid and everything below it (see the top of the file); the PIDs stopped.
local function stop_tree(pid)
  pid = tostring(pid)
  signal("STOP", { pid })
  local all, seen, level = { pid }, { [pid] = true }, { pid }
  while #level > 0 do
    local next_level = {}
    for _, p in ipairs(level) do
      for _, c in ipairs(children(p)) do
        if not seen[c] then
          seen[c] = true
          next_level[#next_level + 1] = c
          all[#all + 1] = c
        end
      end
    end
    signal("STOP", next_level)
    level = next_level
  end
  return all
end

-- Stop pid and everything below it, then kill it all.
local function kill_tree(pid)
  signal("KILL", stop_tree(pid))
end

-- The variables a sandbox start printed (NAME=value lines).
local function parse_env(text)
  local env = {}
  for name, value in text:gmatch("([%w_]+)=([^\n]*)") do env[name] = value end
  return env
end

-- The sshd_config of one host.
local function sshd_config(h)
  local env = h.env
  return table.concat({
    "# written by spec/support/hosts.lua",
    "ListenAddress 127.0.0.1:" .. h.port,
    "HostKey " .. h.dir .. "/ssh_host_ed25519_key",
    "PidFile none",
    "AuthorizedKeysFile " .. h.dir .. "/authorized_keys",
    "AuthenticationMethods publickey",
    "PubkeyAuthentication yes",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "PermitRootLogin prohibit-password",
    "AllowUsers " .. h.user,
    -- No PAM session (no systemd --user for the login), and the files live under /tmp.
    "UsePAM no",
    "StrictModes no",
    "PermitTTY no",
    "X11Forwarding no",
    "AllowAgentForwarding no",
    "AllowTcpForwarding no",
    "PermitUserEnvironment no",
    "PrintMotd no",
    "LogLevel INFO",
    -- The sandbox's bus and state for every session. SHLVL=1: bash sources ~/.bashrc for a
    -- command run by sshd only at shell level 1, and root's here takes seconds (pyenv).
    ("SetEnv XDG_RUNTIME_DIR=%s DBUS_SESSION_BUS_ADDRESS=%s XDG_STATE_HOME=%s RR_TEST_HOST=%s SHLVL=1")
      :format(env.XDG_RUNTIME_DIR, env.DBUS_SESSION_BUS_ADDRESS, env.XDG_STATE_HOME, h.name),
    "",
  }, "\n")
end

-- The client's entry for one host.
local function ssh_entry(h, base)
  return table.concat({
    "Host " .. h.name,
    "  HostName 127.0.0.1",
    "  Port " .. h.port,
    "  User " .. h.user,
    "  HostKeyAlias " .. h.name,
    "  IdentityFile " .. base .. "/id_ed25519",
    "  IdentitiesOnly yes",
    "  IdentityAgent none",
    "  UserKnownHostsFile " .. base .. "/known_hosts",
    "  GlobalKnownHostsFile /dev/null",
    "  StrictHostKeyChecking yes",
    "  CheckHostIP no",
    "  BatchMode yes",
    "  ConnectTimeout 5",
    -- One connection per host, reused by every ssh (bus, commands): ssh forks the master
    -- in the background and it leaves ControlPersist seconds after its last client.
    "  ControlMaster auto",
    "  ControlPath " .. base .. "/cm-%C",
    "  ControlPersist 30",
    -- A host that stops answering (not one that closes) is given up after about 6 s.
    "  ServerAliveInterval 2",
    "  ServerAliveCountMax 3",
    "  LogLevel ERROR",
    "",
  }, "\n")
end

-- Write a unit file into the host's unit directory (units.render's opts; its output goes to
-- DIR/log/NAME.log). Returns the path. Daemon-reload through the host's manager yourself.
local function write_unit(h, name, opts)
  opts = opts or {}
  if opts.log == nil then
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.log = h.dir .. "/log/" .. name .. ".log"
    opts = o
  end
  local path = h.unit_dir .. "/" .. name
  assert(fs.write_atomic(path, units.render(name, opts)))
  return path
end

-- The host drops: its sshd (with every connection and remote command) and its manager are
-- killed by PID. Idempotent.
local function kill_host(h)
  if h.sshd then
    kill_tree(h.sshd:pid())
    h.sshd:wait()
    h.sshd:close()
    h.sshd = nil
  end
  if h.manager_pid then
    signal("KILL", { tostring(h.manager_pid) })
    h.manager_pid = nil
  end
end

-- The host stops answering (a network that drops every packet, a machine that hangs): its sshd
-- and every process below it are stopped; connections stay open and silent. thaw() lets them go on.
local function freeze_host(h)
  if h.sshd and not h.frozen then h.frozen = stop_tree(h.sshd:pid()) end
end

local function thaw_host(h)
  if h.frozen then
    signal("CONT", h.frozen)
    h.frozen = nil
  end
end

-- Kill the host, then let the sandbox clean up what is left of it. Idempotent.
local function stop_host(h)
  kill_host(h)
  if not h.stopped then
    h.stopped = true
    proc.run({ hosts.sandbox, "stop", h.dir }, { timeout = 60 })
  end
end

-- Start n test hosts (see the top of the file). Raises, leaving nothing running, when one
-- cannot start.
function hosts.start(n)
  assert(math.type(n) == "integer" and n >= 1, "hosts.start(n): n must be a positive integer")
  local base = assert(fs.mkdtemp("/tmp/rrhosts."))
  local list = { base = base }
  local ok, err = pcall(function()
    -- sshd refuses to start without its privilege separation directory.
    assert(fs.mkdir_p("/run/sshd", "0755"))
    run({ "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rrengine-spec", "-f", base .. "/id_ed25519" },
      "ssh-keygen (client key)")
    local user_key_pub = assert(fs.read(base .. "/id_ed25519.pub"))
    local user = user_name()
    local known, config = {}, {}
    for i = 1, n do
      local h = { name = "h" .. i, dir = base .. "/h" .. i, user = user, ssh_config = base .. "/ssh_config",
                  write_unit = write_unit, kill = kill_host, stop = stop_host, freeze = freeze_host,
                  thaw = thaw_host }
      list[i] = h
      local res = run({ hosts.sandbox, "start", h.dir }, "sandbox start " .. h.dir, { timeout = 60 })
      h.env = parse_env(res.stdout)
      h.unit_dir = h.env.RR_SANDBOX_UNIT_DIR
      h.manager_pid = tonumber(h.env.RR_SANDBOX_PID)
      run({ "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", h.dir .. "/ssh_host_ed25519_key" },
        "ssh-keygen (host key)")
      h.port = units.free_port()
      assert(fs.write_atomic(h.dir .. "/authorized_keys", user_key_pub, { mode = "0600" }))
      assert(fs.write_atomic(h.dir .. "/sshd_config", sshd_config(h)))
      local host_pub = assert(fs.read(h.dir .. "/ssh_host_ed25519_key.pub"))
      known[#known + 1] = h.name .. " " .. host_pub:match("^(%S+ %S+)")
      config[#config + 1] = ssh_entry(h, base)
      -- sshd logs "Server listening on 127.0.0.1 port N." once it listens: wait for that line.
      h.sshd = spawn_until({ SSHD, "-D", "-e", "-f", h.dir .. "/sshd_config" }, "^Server listening on", 10)
      h.sshd_pid = h.sshd:pid()
    end
    assert(fs.write_atomic(base .. "/known_hosts", table.concat(known, "\n") .. "\n"))
    assert(fs.write_atomic(base .. "/ssh_config", "# written by spec/support/hosts.lua\n" .. table.concat(config, "\n")))
  end)
  if not ok then
    hosts.stop(list)
    error(err, 2)
  end
  return list
end

-- Stop every host of a start() and remove its files. Idempotent.
function hosts.stop(list)
  for _, h in ipairs(list) do stop_host(h) end
  if list.base and not list.removed then
    list.removed = true
    fs.remove_tree(list.base)
  end
end

-- The argv of ssh to host h running argv (no quoting: for plain words only; rr.remote quotes).
function hosts.ssh(h, ...)
  local argv = { "ssh", "-F", h.ssh_config, "-T", "--", h.name }
  for _, a in ipairs({ ... }) do argv[#argv + 1] = a end
  return argv
end

hosts.kill_tree = kill_tree

return hosts
