-- rr.remote: what runs on a host besides its service manager's bus (rr.systemd.remote): commands
-- over ssh with their arguments quoted right, rsync over ssh, and the per-host run lock.
--
-- ssh sends the remote side one string, which the remote user's login shell parses: an argv
-- given here reaches the host byte for byte only if every word is quoted for that shell. Every
-- argument is put in single quotes (inside which a POSIX shell takes every byte literally), a
-- single quote as '\'' (close, an escaped quote, reopen). rsync's -e is a different language:
-- rsync splits that string itself, where a quote inside single quotes is doubled.
--
-- The lock holds while the engine lives, and no longer: a remote holder (flock on the lock file,
-- then a sleep that keeps the descriptor) on a connection of its own, which dies with that
-- connection (PR_SET_PDEATHSIG from setpriv: its parent is the connection's sshd process), whose
-- local ssh dies with the engine (setpriv again: its parent is the engine). Why not a client of
-- someone's ControlMaster connection: a command on it outlives its ssh client (the connection's
-- sshd process, its parent, stays), and a command that waits for the end of its input cannot be
-- used, since rr.proc closes a child's stdin once written.
--
-- The lock's connection is the host's one connection for the run: it is the ControlMaster
-- (ControlPersist=no, a socket in a private directory of ours), and every later ssh to that host
-- (commands, rsync) goes through it until the lock is released: one TCP connection and one
-- authentication per host, however many files a deploy stats and hashes. Our options come first
-- on the command line, where ssh takes the first value of each: the user's own config cannot
-- send them elsewhere. When it dies with the engine, every session on it dies too.
local rr = require("rr")
local proc = require("rr.proc")
local fs = require("rr.fs")

local remote = {}

-- The exit code ssh reserves for its own failures (cannot connect, log in, ...).
local SSH_FAILED = 255
-- The exit code the remote coreutils `timeout` gives a command it had to stop.
local TIMED_OUT = 124
-- The exit code of the lock holder when another one holds the lock.
local LOCK_HELD = 75
local LOCK_CANNOT = 71

-- Raise a misuse error at the caller's caller.
local function misuse(fmt, ...)
  error(fmt:format(...), 3)
end

-- One word for a POSIX shell: in single quotes, a ' as '\''.
function remote.quote(s)
  if type(s) ~= "string" then s = tostring(s) end
  if s:find("\0", 1, true) then misuse("cannot pass a NUL byte in an argument") end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The ssh destination: one word that ssh cannot take for an option.
local function check_host(host)
  if type(host) ~= "string" or host == "" or host:find("[%s%c]") or host:sub(1, 1) == "-" then
    misuse("bad host %s", type(host) == "string" and ("%q"):format(host) or tostring(host))
  end
  return host
end

-- The ssh config to use: opts.ssh_config, else $RR_SSH_CONFIG, else ssh's own.
local function ssh_config(opts)
  local c = opts and opts.ssh_config
  if c == nil then
    c = os.getenv("RR_SSH_CONFIG")
    if c == "" then c = nil end
  elseif type(c) ~= "string" or c == "" then
    misuse("bad option 'ssh_config' (a path expected)")
  end
  return c
end

local NAME = "^[A-Za-z_][A-Za-z0-9_]*$"

-- The remote command line for argv: `[cd -- DIR &&] [NAME=VALUE; export NAME;] [exec timeout
-- -k GRACE SECS] exec ARGV...`, every word quoted. exec: the command takes the shell's place (its
-- exit status is ssh's, and nothing of ours stays behind on the host).
function remote.command_line(argv, opts)
  if type(argv) ~= "table" or #argv == 0 then misuse("argv must be a non-empty list of strings") end
  opts = opts or {}
  local parts = {}
  if opts.cwd ~= nil then
    if type(opts.cwd) ~= "string" or opts.cwd == "" then misuse("bad option 'cwd' (a path expected)") end
    parts[#parts + 1] = "cd -- " .. remote.quote(opts.cwd) .. " || exit 1;"
  end
  if opts.env ~= nil then
    if type(opts.env) ~= "table" then misuse("bad option 'env' (a table expected)") end
    local names = {}
    for name in pairs(opts.env) do
      if type(name) ~= "string" or not name:match(NAME) then misuse("bad environment name %s", tostring(name)) end
      names[#names + 1] = name
    end
    table.sort(names)
    for _, name in ipairs(names) do
      parts[#parts + 1] = ("%s=%s; export %s;"):format(name, remote.quote(opts.env[name]), name)
    end
  end
  local words = { "exec" }
  if opts.remote_timeout then
    words[#words + 1] = "timeout -k " .. opts.remote_grace .. " " .. opts.remote_timeout
  end
  for i, a in ipairs(argv) do
    if type(a) ~= "string" and type(a) ~= "number" then misuse("argv[%d] is not a string", i) end
    words[#words + 1] = remote.quote(a)
  end
  parts[#parts + 1] = table.concat(words, " ")
  return table.concat(parts, " ")
end

-- The control socket of each host whose lock this engine holds: host -> path.
local shared = {}
-- The private directory of those sockets (mode 0700), made at the first lock.
local control_dir
local control_seq = 0

-- ssh's own options for every command: no X11, no terminal, never a prompt nobody would see;
-- then the host's shared connection, if this engine holds one (extra's own ControlPath, first
-- on the line, wins).
local function ssh_prefix(host, opts, extra)
  local argv = { "ssh" }
  local cfg = ssh_config(opts)
  if cfg then
    argv[#argv + 1] = "-F"
    argv[#argv + 1] = cfg
  end
  for _, a in ipairs({ "-x", "-T", "-o", "BatchMode=yes" }) do argv[#argv + 1] = a end
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  if shared[host] then
    for _, a in ipairs({ "-o", "ControlMaster=no", "-o", "ControlPath=" .. shared[host] }) do argv[#argv + 1] = a end
  end
  argv[#argv + 1] = "--"
  argv[#argv + 1] = check_host(host)
  return argv
end

-- Sessions at once on a host's shared connection: sshd refuses more than MaxSessions (10 by
-- default) on one connection, and ssh then exits 255 as if the host were gone. The lock holds
-- one; rsync and the transient units' ssh take a few more.
local MAX_SESSIONS = 6
local sessions = {} -- host -> the tasks running a command on its shared connection

-- proc.run(cmd, popts), as one of at most MAX_SESSIONS sessions on host's shared connection
-- (without one, every command has a connection of its own: no limit). Waits for a session to end
-- (the tasks' own ends: no polling) when all are taken.
local function run_session(host, cmd, popts)
  if not shared[host] then return proc.run(cmd, popts) end
  local running = sessions[host] or {}
  sessions[host] = running
  while true do
    -- a session whose task ended is free, whether or not its caller has run since
    for i = #running, 1, -1 do
      local st = running[i]:status()
      if st == "done" or st == "failed" or st == "canceled" then table.remove(running, i) end
    end
    if #running < MAX_SESSIONS then break end
    rr.wait_any(running)
  end
  local kids <close> = rr.children()
  local t = kids:spawn(function() return proc.run(cmd, popts) end)
  running[#running + 1] = t
  local ok, res, err, code, r = rr.wait(t)
  for i, x in ipairs(running) do if x == t then table.remove(running, i) break end end
  if not ok then error(res, 0) end -- the run raised (misuse): as proc.run would have
  return res, err, code, r
end

-- ssh's argv that runs argv on host: ssh [-F CONFIG] -x -T -o BatchMode=yes -- HOST 'LINE'.
-- opts: ssh_config, cwd and env (on the host).
function remote.command(host, argv, opts)
  local line = remote.command_line(argv, opts)
  local out = ssh_prefix(host, opts)
  out[#out + 1] = line
  return out
end

-- The last non-empty line of s, or nil.
local function last_line(s)
  local last
  for line in (s or ""):gmatch("[^\r\n]+") do
    if line:find("%S") then last = line end
  end
  return last
end

local RUN_OPTS = { ssh_config = true, cwd = true, env = true, timeout = true, kill_grace = true, on_line = true,
                   stdin = true, capture = true, max_capture = true }

-- Run argv on host through ssh (rr.proc.run). Returns proc.run's shapes, with messages that name
-- the command and the host:
--   res                                                           exited 0
--   nil, "CMD on HOST exited with code N", "EEXIT", res            the command failed
--   nil, "CMD on HOST timed out after T s (killed)", "ETIMEDOUT", res   opts.timeout passed
--   nil, "cannot reach HOST: <ssh's reason>", "EHOSTUNREACH", res  ssh failed: exit code 255
--   nil, "cannot run ssh: ...", "ENOENT"                           no ssh here
-- opts: ssh_config; cwd, env: on the host; timeout: the command is stopped on the host too
-- (coreutils `timeout -k kill_grace`: a remote command never outlives its time because its ssh
-- went away), and ssh here a little later; kill_grace (2), on_line, stdin, capture, max_capture.
function remote.run(host, argv, opts)
  opts = opts or {}
  for k in pairs(opts) do
    if not RUN_OPTS[k] then misuse("unknown option '%s'", tostring(k)) end
  end
  local line_opts = { cwd = opts.cwd, env = opts.env, ssh_config = opts.ssh_config }
  local popts = { on_line = opts.on_line, stdin = opts.stdin, capture = opts.capture,
                  max_capture = opts.max_capture, kill_grace = opts.kill_grace }
  if opts.timeout ~= nil then
    if type(opts.timeout) ~= "number" or opts.timeout <= 0 then misuse("bad option 'timeout' (seconds > 0)") end
    local grace = opts.kill_grace or 2
    line_opts.remote_timeout = ("%g"):format(opts.timeout)
    line_opts.remote_grace = ("%g"):format(grace)
    -- ssh's own bound comes later, for a host that stops answering.
    popts.timeout = opts.timeout + grace + 10
  end
  local cmd = remote.command(host, argv, line_opts)
  local res, err, code, r = run_session(host, cmd, popts)
  if res then return res end
  if not r then return nil, err, code end
  local what = ("%s on %s"):format(tostring(argv[1]), host)
  if r.timed_out then
    return nil, ("ssh to %s timed out after %g s (killed)"):format(host, popts.timeout), "ETIMEDOUT", r
  elseif r.exit_code == SSH_FAILED then
    r.unreachable = true
    return nil, ("cannot reach %s: %s"):format(host, last_line(r.stderr) or "ssh exited with code 255"),
      "EHOSTUNREACH", r
  elseif r.exit_code == TIMED_OUT and opts.timeout then
    r.timed_out = true
    return nil, ("%s timed out after %g s (killed)"):format(what, opts.timeout), "ETIMEDOUT", r
  elseif r.exit_code then
    return nil, ("%s exited with code %d"):format(what, r.exit_code), "EEXIT", r
  end
  return nil, ("ssh to %s killed by %s"):format(host, tostring(r.signal)), "ESIGNAL", r
end

-- A word for rsync's -e: rsync splits that string at spaces itself, keeping what is inside
-- single quotes, where a doubled quote is one quote (and a backslash is just a backslash).
local function rsync_word(s)
  if s:find("[%c]") then misuse("cannot pass a control character to rsync's -e: %q", s) end
  return "'" .. s:gsub("'", "''") .. "'"
end

-- rsync's argv that copies src to dst on host (opts.pull: src on host to dst here), through
-- ssh with our config: rsync OPTIONS... -e "'ssh' '-F' 'CONFIG' ..." -- SRC HOST:DST. options:
-- rsync's options (a list, before -e). The remote path goes to the remote rsync safely quoted by
-- rsync itself (3.2.4 and later escape its arguments).
function remote.rsync_argv(host, options, src, dst, opts)
  check_host(host)
  if type(options) ~= "table" then misuse("options must be a list of rsync options") end
  if type(src) ~= "string" or src == "" or type(dst) ~= "string" or dst == "" then
    misuse("src and dst must be paths")
  end
  opts = opts or {}
  local argv = { "rsync" }
  for _, o in ipairs(options) do argv[#argv + 1] = o end
  local ssh = ssh_prefix(host, opts)
  -- rsync puts the host after these words itself: drop "--" and the host.
  ssh[#ssh] = nil
  ssh[#ssh] = nil
  local words = {}
  for i, w in ipairs(ssh) do words[i] = rsync_word(w) end
  argv[#argv + 1] = "-e"
  argv[#argv + 1] = table.concat(words, " ")
  argv[#argv + 1] = "--"
  if opts.pull then
    argv[#argv + 1] = host .. ":" .. src
    argv[#argv + 1] = dst
  else
    argv[#argv + 1] = src
    argv[#argv + 1] = host .. ":" .. dst
  end
  return argv
end

-- ---- the per-host run lock ----

-- The holder: takes the lock on the host (see the top of the file) and prints one line,
-- "rr-lock acquired PID FILE", or, when another holds it, "rr-lock held FILE" and the file's
-- content (who holds it) and exits 75. $1 the lock file ("" for the default of the scope $3),
-- $2 what to write into it, $4 how long to wait for it (seconds, 0: not at all).
local HOLDER = [[
f=$1
if [ -z "$f" ]; then
  if [ "$3" = user ]; then f=${XDG_STATE_HOME:-$HOME/.local/state}/rrengine/run.lock
  else f=/var/lib/rrengine/run.lock; fi
fi
mkdir -p -- "${f%/*}" || exit 71
exec 9>>"$f" || exit 71
if [ "$4" = 0 ]; then flock -n -E 75 9; else flock -w "$4" -E 75 9; fi
s=$?
if [ $s -ne 0 ]; then
  printf 'rr-lock held %s\n' "$f"
  cat -- "$f"
  exit $s
fi
printf '%s\n' "$2" >"$f" || exit 71
printf 'rr-lock acquired %s %s\n' "$$" "$(readlink -f -- "$f")"
exec setpriv --pdeathsig KILL -- sh -c '[ "$PPID" = "$1" ] && exec sleep infinity' rr-lock "$PPID"
]]

-- Kills the holder PID ($1) only if it holds the lock file $2 (on its descriptor 9).
local RELEASER = [[[ "$(readlink "/proc/$1/fd/9")" = "$2" ] && kill "$1"]]

-- This machine's name, for the holder line.
local function hostname()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local name = f and f:read("l")
  if f then f:close() end
  return name or "?"
end

-- The errno name a shell's message about a file says.
local function file_error_code(text)
  if text:find("Permission denied", 1, true) then return "EACCES" end
  if text:find("No space", 1, true) then return "ENOSPC" end
  if text:find("Read%-only") then return "EROFS" end
  if text:find("nonexistent", 1, true) or text:find("No such file", 1, true) then return "ENOENT" end
  return "EIO"
end

local Lock = {}
Lock.__index = Lock

-- Release the lock: the holder on the host is killed, then its connection ends. Idempotent;
-- never fails (a host that cannot be reached any more frees it when its sshd sees the
-- connection gone).
function Lock:unlock()
  local p = self.proc
  if not p then return true end
  self.proc = nil
  if self._control and shared[self._host] == self._control then shared[self._host] = nil end
  if p:running() then
    local ok = remote.run(self._host, { "sh", "-c", RELEASER, "rr-unlock", self._pid, self._path },
      { ssh_config = self._ssh_config, timeout = 10 })
    -- The holder gone, its ssh here ends: the file is free once that wait returns.
    if ok then rr.with_timeout(10, p.wait, p) end
  end
  p:close()
  if control_dir and next(shared) == nil then
    fs.remove_tree(control_dir)
    control_dir = nil
  end
  return true
end
Lock.__close = Lock.unlock

-- true while the lock is held (false once released, or once its connection dropped).
function Lock:held()
  return self.proc ~= nil and self.proc:running()
end

-- The lock file on the host (the default resolved there).
function Lock:path() return self._path end

-- The host.
function Lock:host() return self._host end

-- The control socket of the host's shared connection (every ssh to the host goes through it
-- while the lock is held), or nil when ssh could not make one.
function Lock:control_path() return self._control end

-- What this lock wrote into the file (who holds it).
function Lock:holder() return self._holder end

local LOCK_OPTS = { ssh_config = true, path = true, user = true, wait = true, holder = true, timeout = true }

-- Take the run lock of host: lock | nil, message, code[, holder].
--   nil, "h1 is locked by: host=ci1 pid=4242 ...", "EWOULDBLOCK", "host=ci1 pid=4242 ..."
--   nil, "cannot lock h1: cannot reach h1: ...", "EHOSTUNREACH"
--   nil, "cannot lock h1: ... Permission denied", "EACCES" (ENOSPC, EROFS, ENOENT, EIO)
-- opts: ssh_config; path (the lock file on the host; default: /var/lib/rrengine/run.lock, or
-- with user = true ${XDG_STATE_HOME:-$HOME/.local/state}/rrengine/run.lock, resolved there);
-- wait (seconds to wait for a holder to leave, default 0); holder (written into the file;
-- default "host=THIS pid=ENGINE_PID since=UTC_TIME"); timeout (for ssh, default 30 s + wait).
function remote.lock(host, opts)
  opts = opts or {}
  for k in pairs(opts) do
    if not LOCK_OPTS[k] then misuse("unknown option '%s'", tostring(k)) end
  end
  check_host(host)
  local wait = opts.wait or 0
  if type(wait) ~= "number" or wait < 0 then misuse("bad option 'wait' (seconds >= 0)") end
  if opts.path ~= nil and (type(opts.path) ~= "string" or opts.path == "") then
    misuse("bad option 'path' (a path expected)")
  end
  local holder = opts.holder or ("host=%s pid=%d since=%s"):format(hostname(), fs.getpid(),
    os.date("!%Y-%m-%dT%H:%M:%SZ"))
  if type(holder) ~= "string" then misuse("bad option 'holder' (a string expected)") end
  local limit = (opts.timeout or 30) + wait

  -- A connection of its own, in a process that dies with the engine, and the master of the
  -- host's later ssh commands (see the top of the file).
  local control
  if not control_dir then
    local base = os.getenv("XDG_RUNTIME_DIR")
    -- the socket's whole path must stay short (see below)
    if not base or base:sub(1, 1) ~= "/" or #base > 50 then base = "/tmp" end
    control_dir = fs.mkdtemp(base .. "/rrengine-ssh.")
  end
  local extra = { "-o", "ControlMaster=no", "-o", "ControlPath=none" }
  if control_dir and not shared[host] then
    control_seq = control_seq + 1
    control = ("%s/%d"):format(control_dir, control_seq)
    -- a unix socket path has at most 107 bytes (ssh adds a suffix while it binds): a longer one
    -- would make ssh refuse the whole connection, so the lock goes without sharing it
    if #control > 80 then
      control = nil
    else
      extra = { "-o", "ControlMaster=yes", "-o", "ControlPath=" .. control, "-o", "ControlPersist=no" }
    end
  end
  local cmd = ssh_prefix(host, opts, extra)
  cmd[#cmd + 1] = remote.command_line({ "sh", "-c", HOLDER, "rr-lock", opts.path or "", holder,
    opts.user and "user" or "system", ("%d"):format(math.ceil(wait)) })
  table.insert(cmd, 1, "--")
  table.insert(cmd, 1, "KILL")
  table.insert(cmd, 1, "--pdeathsig")
  table.insert(cmd, 1, "setpriv")

  local lines, acquired = {}, nil
  local gate = rr.spawn(function() rr.sleep(limit) end)
  local p, err, code = proc.spawn(cmd, {
    on_line = function(stream, line)
      if stream == "stdout" and not acquired then
        local pid, path = line:match("^rr%-lock acquired (%d+) (.+)$")
        if pid then
          acquired = { pid = pid, path = path }
          gate:cancel() -- the line is the signal
          return
        end
      end
      if #lines < 100 then lines[#lines + 1] = { stream, line } end
    end,
  })
  if not p then
    gate:cancel()
    return nil, ("cannot lock %s: %s"):format(host, err), code
  end
  local exited = rr.spawn(function() return p:wait() end)
  rr.wait_any(gate, exited)
  gate:cancel()
  if acquired then
    exited:cancel()
    -- the holder runs, so the master is up and its socket listens
    if control and fs.exists(control) then shared[host] = control else control = nil end
    return setmetatable({ proc = p, _pid = acquired.pid, _path = acquired.path, _host = host, _holder = holder,
                          _ssh_config = ssh_config(opts), _control = control }, Lock)
  end
  if control_dir and next(shared) == nil then
    fs.remove_tree(control_dir)
    control_dir = nil
  end
  if p:running() then
    exited:cancel()
    p:close()
    return nil, ("cannot lock %s: no answer within %g s"):format(host, limit), "ETIMEDOUT"
  end
  local _, _, _, res = p:wait()
  p:close()
  local out, errs = {}, {}
  for _, l in ipairs(lines) do
    if l[1] == "stdout" then out[#out + 1] = l[2] else errs[#errs + 1] = l[2] end
  end
  local status = res and res.exit_code
  if status == LOCK_HELD and out[1] and out[1]:match("^rr%-lock held ") then
    local who = table.concat(out, " ", 2)
    if who == "" then who = "another run (that has not written its name yet)" end
    return nil, ("%s is locked by: %s"):format(host, who), "EWOULDBLOCK", who
  elseif status == SSH_FAILED then
    return nil, ("cannot lock %s: cannot reach %s: %s"):format(host, host, errs[#errs] or "ssh exited with code 255"),
      "EHOSTUNREACH"
  elseif status == LOCK_CANNOT then
    local why = errs[#errs] or "cannot open the lock file"
    return nil, ("cannot lock %s: %s"):format(host, why), file_error_code(why)
  end
  return nil, ("cannot lock %s: the lock holder ended (%s): %s"):format(host,
    status and ("exit code " .. status) or tostring(res and res.signal), errs[#errs] or ""), "EIO"
end

return remote
