-- rr.hostfs: the files of one host, behind the names rr.fs has. The flow, snapshots, deploy
-- records, the deploy pointers and the run journal live on the host of the service they are
-- about (under that host's state root), so that any engine host can roll back or recover. A
-- module that keeps state takes a handle instead of calling rr.fs, and works the same on this
-- machine (hostfs.here(): rr.fs itself, with run and getenv added) and on another
-- (hostfs.remote(host): each call one command over ssh through rr.remote, on the host's one
-- reused connection).
--
-- A remote handle keeps rr.fs's failure forms: nil, message (naming the path and the host),
-- CODE (the errno name the host's tool reported: ENOENT, EACCES, ENOSPC, ENOTDIR, EISDIR,
-- ENOTEMPTY, EEXIST, ELOOP, EINVAL, EROFS, else EIO), plus EHOSTUNREACH / ETIMEDOUT when the
-- host cannot be reached (handle.lost then says since when and why). Misuse raises, as rr.fs.
-- Writes are atomic on the host as here: a temporary file beside the target (mktemp), its
-- data from stdin, sync, mv over the target, sync of the directory. `under = root` is honoured:
-- no component below root may be a symlink (checked on the host before the write).
local fs = require("rr.fs")
local proc = require("rr.proc")
local remote = require("rr.remote")

local hostfs = {}

-- The operations, one shell script run as `sh -c SCRIPT rr-fs OP ARGS...` on the host. A failure
-- the script detects itself is one stderr line "rr-fs: CODE: message" and exit status 3; the
-- tools' own messages are mapped to codes in Lua.
local SCRIPT = [=[
set -f
fail() { printf 'rr-fs: %s: %s\n' "$1" "$2" >&2; exit 3; }
under() {
  [ -z "$1" ] && return 0
  r=${1%/}; rest=${2#"$r"/}
  [ "$rest" = "$2" ] && fail EINVAL "$2 is not below $r"
  cur=$r; IFS=/
  for c in $rest; do
    cur=$cur/$c
    [ -L "$cur" ] && fail ELOOP "$cur is a symbolic link: refusing to write through it"
  done
  unset IFS
}
dirof() { d=${1%/*}; [ -z "$d" ] && d=/; printf '%s' "$d"; }
op=$1; shift
case $op in
read) [ -d "$1" ] && fail EISDIR "$1: Is a directory"; exec cat -- "$1" ;;
stat) f=; [ "$1" = -L ] && { f=-L; shift; }
      exec stat $f -c '%F|%a|%s|%u|%g|%.9Y|%i|%d|%h' -- "$1" ;;
stats) f=; [ "$1" = -L ] && f=-L
       # the paths on stdin, NUL-separated (a command line has room for a few thousand at most);
       # xargs says 123 when stat failed for some of them: those are missing from the output
       xargs -0 -r stat $f --printf '%n\0%F|%a|%s|%u|%g|%.9Y|%i|%d|%h\0' -- 2>/dev/null
       s=$?; [ $s -eq 0 ] || [ $s -eq 123 ] ;;
shas) xargs -0 -r sh -c '
        for p do
          shift
          if [ -d "$p" ]; then printf "!EISDIR *%s\0" "$p"
          elif [ ! -e "$p" ]; then printf "!ENOENT *%s\0" "$p"
          elif [ ! -r "$p" ]; then printf "!EACCES *%s\0" "$p"
          else set -- "$@" "$p"; fi
        done
        [ $# -eq 0 ] || exec sha256sum -z -b -- "$@"' rr-sha
      s=$?; [ $s -eq 0 ] || [ $s -eq 123 ] ;;
links) xargs -0 -r sh -c 'exec find -P "$@" -maxdepth 0 -printf "%p\0%y\0%l\0"' rr-links 2>/dev/null
       s=$?; [ $s -eq 0 ] || [ $s -eq 123 ] ;;
sha) [ -d "$1" ] && fail EISDIR "$1: Is a directory"; exec sha256sum -b -- "$1" ;;
list) [ -e "$1" ] || fail ENOENT "$1: No such file or directory"
      [ -d "$1" ] || fail ENOTDIR "$1: Not a directory"
      exec find -H "$1" -mindepth 1 -maxdepth 1 -printf '%f\0' ;;
realpath) exec realpath -e -- "$1" ;;
readlink) [ -L "$1" ] || { [ -e "$1" ] || fail ENOENT "$1: No such file or directory"; fail EINVAL "$1 is not a symbolic link"; }
          exec readlink -- "$1" ;;
statvfs) exec stat -f -L -c '%S %s %b %f %a %c %d' -- "$1" ;;
mkdir) under "$3" "$1"
       if [ -e "$1" ] && [ ! -d "$1" ]; then fail ENOTDIR "$1: Not a directory"; fi
       exec mkdir -p -m "$2" -- "$1" ;;
remove) under "$2" "$1"
        if [ -d "$1" ] && [ ! -L "$1" ]; then exec rmdir -- "$1"; fi
        [ -e "$1" ] || [ -L "$1" ] || fail ENOENT "$1: No such file or directory"
        exec rm -f -- "$1" ;;
rename) under "$3" "$1"; under "$3" "$2"
        [ -e "$1" ] || [ -L "$1" ] || fail ENOENT "$1: No such file or directory"
        exec mv -fT -- "$1" "$2" ;;
rmtree) under "$2" "$1"
        [ -e "$1" ] || [ -L "$1" ] || fail ENOENT "$1: No such file or directory"
        exec rm -rf --one-file-system -- "$1" ;;
symlink) exec ln -s -- "$1" "$2" ;;
fsyncdir) exec sync -- "$1" ;;
write|copy)
  # write PATH MODE SYNC ROOT LENGTH (data on stdin) / copy SRC PATH MODE SYNC ROOT
  if [ "$op" = copy ]; then
    s=$1; shift
    [ -L "$s" ] && fail ELOOP "$s is a symbolic link"
    [ -d "$s" ] && fail EISDIR "$s: Is a directory"
    [ -e "$s" ] || fail ENOENT "$s: No such file or directory"
    [ -f "$s" ] || fail EINVAL "$s is not a regular file"
  fi
  p=$1; m=$2; sy=$3; under "$4" "$p"
  d=$(dirof "$p"); b=${p##*/}
  [ -d "$d" ] || fail ENOENT "$d: No such file or directory"
  t=$(mktemp -- "$d/.$b.XXXXXX") || exit 1
  trap 'rm -f -- "$t"' EXIT
  if [ "$op" = copy ]; then cp -p -- "$s" "$t" || exit 1
  else
    # all of it, or nothing: an engine killed mid-send ends stdin early
    cat >"$t" || exit 1
    [ "$(wc -c <"$t")" -eq "$5" ] || fail EIO "$p: the data was cut short in transfer; left as it was"
  fi
  if [ -n "$m" ]; then chmod "$m" "$t" || exit 1
  elif [ "$op" = write ]; then
    if [ -f "$p" ] && [ ! -L "$p" ]; then chmod --reference="$p" "$t" && { chown --reference="$p" "$t" 2>/dev/null; :; } || exit 1
    else chmod "$(printf '%o' $((0666 & ~0$(umask))))" "$t" || exit 1; fi
  fi
  if [ "$sy" = 1 ]; then sync -- "$t" || exit 1; fi
  mv -fT -- "$t" "$p" || exit 1
  trap - EXIT
  if [ "$sy" = 1 ]; then sync -- "$d" || exit 1; fi ;;
removes)
  # paths on stdin, in the order given (deepest first, when that matters): each as `remove`
  # does it (rmdir a directory, rm anything else), then one record per path: "ok" or the
  # failure, then the path
  xargs -0 -r sh -c '
    for p do
      if [ -d "$p" ] && [ ! -L "$p" ]; then e=$(rmdir -- "$p" 2>&1)
      elif [ -e "$p" ] || [ -L "$p" ]; then e=$(rm -f -- "$p" 2>&1)
      else e="ENOENT: $p: No such file or directory"; false; fi
      if [ $? -eq 0 ]; then printf "ok\0%s\0" "$p"; else printf "%s\0%s\0" "${e:-EIO: failed}" "$p"; fi
    done' rr-removes
  s=$?; [ $s -eq 0 ] || [ $s -eq 123 ] ;;
copies)
  # ROOT, and SRC DST pairs on stdin: each as `copy` does it with sync (a temporary file beside
  # DST, synced, renamed over it, its directory synced; nothing written through a symlink below
  # ROOT); one record per pair as for removes
  xargs -0 -r -n 2 sh -c '
    set -f
    root=$1 s=$2 p=$3
    fail() { printf "%s: %s\0%s\0" "$1" "$2" "$p"; exit 0; }
    if [ -n "$root" ]; then
      r=${root%/}; rest=${p#"$r"/}
      [ "$rest" = "$p" ] && fail EINVAL "$p is not below $r"
      cur=$r; IFS=/
      for c in $rest; do
        cur=$cur/$c
        [ -L "$cur" ] && fail ELOOP "$cur is a symbolic link: refusing to write through it"
      done
      unset IFS
    fi
    [ -L "$s" ] && fail ELOOP "$s is a symbolic link"
    [ -d "$s" ] && fail EISDIR "$s: Is a directory"
    [ -e "$s" ] || fail ENOENT "$s: No such file or directory"
    [ -f "$s" ] || fail EINVAL "$s is not a regular file"
    d=${p%/*}; [ -z "$d" ] && d=/; b=${p##*/}
    [ -d "$d" ] || fail ENOENT "$d: No such file or directory"
    t=$(mktemp -- "$d/.$b.XXXXXX" 2>&1) || fail EIO "$t"
    if e=$(cp -p -- "$s" "$t" 2>&1 && sync -- "$t" 2>&1 && mv -fT -- "$t" "$p" 2>&1 && sync -- "$d" 2>&1); then
      printf "ok\0%s\0" "$p"
    else
      rm -f -- "$t"; printf "%s\0%s\0" "${e:-EIO: failed}" "$p"
    fi' rr-copies "$1"
  s=$?; [ $s -eq 0 ] || [ $s -eq 123 ] ;;
facts)
  printf 'home=%s\n' "$HOME"
  printf 'xdg_config_home=%s\n' "$XDG_CONFIG_HOME"
  printf 'xdg_runtime_dir=%s\n' "$XDG_RUNTIME_DIR"
  printf 'xdg_state_home=%s\n' "$XDG_STATE_HOME"
  printf 'boot_id=%s\n' "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
  printf 'hostname=%s\n' "$(cat /proc/sys/kernel/hostname 2>/dev/null)" ;;
*) fail EINVAL "unknown operation $op" ;;
esac
]=]

local function misuse(fmt, ...)
  error(fmt:format(...), 3)
end

local function check_path(path, what)
  if type(path) ~= "string" or path == "" or path:find("\0", 1, true) then
    misuse("rr.hostfs: %s must be a non-empty path without NUL bytes", what or "path")
  end
  if path:sub(1, 1) ~= "/" then
    misuse("rr.hostfs: %s must be absolute on a remote host, got %s", what or "path", path)
  end
end

-- rr.fs's mode argument: an integer or an octal string -> octal text for chmod.
local function octal(mode)
  if mode == nil then return nil end
  if type(mode) == "string" then
    local n = tonumber(mode, 8)
    if not n then misuse("rr.hostfs: bad mode %q", mode) end
    mode = n
  end
  if math.type(mode) ~= "integer" or mode < 0 or mode > 4095 then misuse("rr.hostfs: bad mode %s", tostring(mode)) end
  return ("%04o"):format(mode)
end

local function under_of(opts)
  if opts == nil then return "" end
  if type(opts) ~= "table" then misuse("rr.hostfs: options must be a table") end
  return opts.under and tostring(opts.under):gsub("/+$", "") or ""
end

local function check_under(root, path)
  if root ~= "" and not (path == root or path:sub(1, #root + 1) == root .. "/") then
    misuse("rr.hostfs: %s is not below the state root %s", path, root)
  end
end

-- The errno name a tool's message says.
local function code_of(text)
  local c = text:match("rr%-fs: (%u+):")
  if c then return c end
  local map = {
    { "No such file", "ENOENT" }, { "Permission denied", "EACCES" }, { "Operation not permitted", "EPERM" },
    { "No space", "ENOSPC" }, { "Not a directory", "ENOTDIR" }, { "Is a directory", "EISDIR" },
    { "not empty", "ENOTEMPTY" }, { "File exists", "EEXIST" }, { "Read%-only", "EROFS" },
    { "Too many levels", "ELOOP" }, { "Invalid argument", "EINVAL" },
  }
  for _, m in ipairs(map) do
    if text:find(m[1]) then return m[2] end
  end
  return "EIO"
end

local function last_line(s)
  local last
  for line in (s or ""):gmatch("[^\n]+") do
    if line:find("%S") then last = line end
  end
  return last
end

-- hostfs.here() -> the handle of this machine: rr.fs's functions, plus run (rr.proc.run),
-- getenv (os.getenv), host = nil, remote = false.
local here
function hostfs.here()
  if not here then
    here = setmetatable({
      remote = false,
      run = function(argv, opts) return proc.run(argv, opts) end,
      getenv = os.getenv,
      describe = function() return "this machine" end,
      -- the batch calls of a remote handle, one call a path here (a local call is cheap)
      stat_many = function(paths, follow)
        local out = {}
        for _, p in ipairs(paths) do out[p] = fs.stat(p, follow) or false end
        return out
      end,
      sha256_many = function(paths)
        local sums, codes = {}, {}
        for _, p in ipairs(paths) do
          local sum, _, code = fs.sha256(p)
          sums[p] = sum or false
          if not sum then codes[p] = code or "EIO" end
        end
        return sums, codes
      end,
      readlink_many = function(paths)
        local out = {}
        for _, p in ipairs(paths) do out[p] = fs.readlink(p) or false end
        return out
      end,
      remove_many = function(paths)
        local done, errs = {}, {}
        for _, p in ipairs(paths) do
          local ok, err, code = fs.remove(p)
          done[p] = ok == true
          if not ok then errs[p] = { code = code or "EIO", message = tostring(err) } end
        end
        return done, errs
      end,
      copy_many = function(pairs_, opts)
        local done, errs = {}, {}
        for _, pr in ipairs(pairs_) do
          local ok, err, code = fs.copy_atomic(pr[1], pr[2], opts)
          done[pr[2]] = ok == true
          if not ok then errs[pr[2]] = { code = code or "EIO", message = tostring(err) } end
        end
        return done, errs
      end,
    }, { __index = fs })
  end
  return here
end

local registry = {}
local settings = {}

-- hostfs.configure{ ssh_config = FILE }: the ssh options every remote handle made from now uses.
function hostfs.configure(opts)
  settings.ssh_config = opts and opts.ssh_config or nil
  registry = {}
end

-- hostfs.get(host) -> the handle of host (nil or false: this machine), one per host per process.
function hostfs.get(host)
  if host == nil or host == false then return hostfs.here() end
  local h = registry[host]
  if not h then
    h = hostfs.remote(host, { ssh_config = settings.ssh_config })
    registry[host] = h
  end
  return h
end

-- hostfs.remote(host[, { ssh_config = FILE, timeout = 120 }]) -> a handle for host's files.
-- hostfs.per_host(make) -> module: make(h) builds a module acting on h's files (rr.snapshot,
-- rr.deploy); the module returned acts on this machine's, and module.on(h) gives (and keeps,
-- while h lives) the one acting on h's. on(nil) is the module itself.
function hostfs.per_host(make)
  local instances = setmetatable({}, { __mode = "k" })
  local here = hostfs.here()
  local default = make(here)
  instances[here] = default
  local function on(h)
    if h == nil then return default end
    local m = instances[h]
    if not m then
      m = make(h)
      m.on = on
      instances[h] = m
    end
    return m
  end
  default.on = on
  return default
end

function hostfs.remote(host, opts)
  opts = opts or {}
  if type(host) ~= "string" or host == "" then misuse("rr.hostfs.remote: bad host %s", tostring(host)) end
  local ssh_config = opts.ssh_config
  local timeout = opts.timeout or 120
  local h = { host = host, remote = true, calls = 0, ssh_config = ssh_config }

  -- Runs one operation -> res | nil, message, CODE, res
  local function op(name, args, extra, what)
    local argv = { "sh", "-c", SCRIPT, "rr-fs", name }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local ropts = { ssh_config = ssh_config, timeout = timeout, capture = true }
    for k, v in pairs(extra or {}) do ropts[k] = v end
    h.calls = h.calls + 1
    local res, err, code, r = remote.run(host, argv, ropts)
    if res then return res end
    if code == "EHOSTUNREACH" or (code == "ETIMEDOUT" and r and not r.exit_code) or code == "ENOENT" and not r then
      h.lost = h.lost or tostring(err)
      return nil, err, code == "ENOENT" and "EHOSTUNREACH" or code, r
    end
    local text = last_line(r and r.stderr) or err
    text = text:gsub("^rr%-fs: %u+: ", "")
    return nil, ("%s on %s: %s"):format(what or args[1] or name, host, text), code_of(r and r.stderr or ""), r
  end
  h.op = op

  function h.describe() return host end

  function h.run(argv, ropts)
    local o = { ssh_config = ssh_config }
    for k, v in pairs(ropts or {}) do o[k] = v end
    local res, err, code, r = remote.run(host, argv, o)
    if not res and code == "EHOSTUNREACH" then h.lost = h.lost or tostring(err) end
    return res, err, code, r
  end

  function h.read(path)
    check_path(path)
    local res, err, code = op("read", { path }, { max_capture = 256 * 1024 * 1024 })
    if not res then return nil, err, code end
    return res.stdout
  end

  local function parse_stat(line)
    local t, mode, size, uid, gid, mtime, ino, dev, nlink =
      line:match("^(.-)|(%d+)|(%d+)|(%d+)|(%d+)|([%d%.]+)|(%d+)|(%d+)|(%d+)$")
    if not t then return nil end
    local kind = "other"
    if t == "regular file" or t == "regular empty file" then kind = "file"
    elseif t == "directory" then kind = "dir"
    elseif t == "symbolic link" then kind = "link" end
    return { type = kind, mode = tonumber(mode, 8), size = math.tointeger(tonumber(size)), uid = math.tointeger(tonumber(uid)),
      gid = math.tointeger(tonumber(gid)), mtime = tonumber(mtime), ino = math.tointeger(tonumber(ino)),
      dev = math.tointeger(tonumber(dev)), nlink = math.tointeger(tonumber(nlink)) }
  end

  function h.stat(path, follow)
    check_path(path)
    local args = follow and { "-L", path } or { path }
    local res, err, code = op("stat", args, nil, path)
    if not res then return nil, err, code end
    local st = parse_stat((res.stdout:gsub("\n$", "")))
    if not st then return nil, ("%s on %s: cannot read its stat"):format(path, host), "EIO" end
    return st
  end

  -- The paths of a batch, checked, as the command's stdin: NUL-separated.
  local function nul_list(paths)
    if type(paths) ~= "table" then misuse("rr.hostfs: expected a list of paths") end
    for _, p in ipairs(paths) do check_path(p) end
    return table.concat(paths, "\0") .. "\0"
  end

  local BATCH = 256 * 1024 * 1024

  -- h.stat_many(paths[, follow]) -> { [path] = st | false } in one command, however many paths
  -- (a remote call costs milliseconds: a deploy of thousands of files must not make one each).
  function h.stat_many(paths, follow)
    local out = {}
    local input = nul_list(paths)
    if #paths == 0 then return out end
    local res, err, code = op("stats", { follow and "-L" or "" }, { stdin = input, max_capture = BATCH }, "stat")
    if not res then return nil, err, code end
    for name, line in res.stdout:gmatch("([^\0]*)\0([^\0]*)\0") do out[name] = parse_stat(line) or false end
    for _, p in ipairs(paths) do
      if out[p] == nil then out[p] = false end
    end
    return out
  end

  -- h.sha256_many(paths) -> { [path] = hex | false }, { [path] = CODE } in one command: for each
  -- path that has no hash, the code h.sha256 gives (ENOENT, EISDIR, EACCES; EIO when the tool
  -- failed on it).
  function h.sha256_many(paths)
    local sums, codes = {}, {}
    local input = nul_list(paths)
    if #paths == 0 then return sums, codes end
    local res, err, code = op("shas", {}, { stdin = input, max_capture = BATCH }, "sha256")
    if not res then return nil, err, code end
    for rec in res.stdout:gmatch("([^\0]*)\0") do
      local head = rec:match("^(%S+) %*")
      if head then
        local p = rec:sub(#head + 3)
        if head:sub(1, 1) == "!" then
          sums[p], codes[p] = false, head:sub(2)
        else
          sums[p] = head
        end
      end
    end
    for _, p in ipairs(paths) do
      if sums[p] == nil then sums[p], codes[p] = false, "EIO" end
    end
    return sums, codes
  end

  -- h.readlink_many(paths) -> { [path] = target | false (missing, or not a symlink) } in one command.
  function h.readlink_many(paths)
    local out = {}
    local input = nul_list(paths)
    if #paths == 0 then return out end
    local res, err, code = op("links", {}, { stdin = input, max_capture = BATCH }, "readlink")
    if not res then return nil, err, code end
    for name, kind, target in res.stdout:gmatch("([^\0]*)\0([^\0]*)\0([^\0]*)\0") do
      out[name] = kind == "l" and target or false
    end
    for _, p in ipairs(paths) do
      if out[p] == nil then out[p] = false end
    end
    return out
  end

  -- The records of removes/copies -> { [path] = true | false }, { [path] = { code =, message = } }
  local function outcomes(stdout, paths)
    local done, errs = {}, {}
    for status, p in stdout:gmatch("([^\0]*)\0([^\0]*)\0") do
      if status == "ok" then done[p] = true
      else
        done[p] = false
        local mine = status:match("^(E%u+): ")
        errs[p] = { code = mine or code_of(status),
          message = ("%s on %s: %s"):format(p, host, (status:gsub("^E%u+: ", ""))) }
      end
    end
    for _, p in ipairs(paths) do
      if done[p] == nil then
        done[p] = false
        errs[p] = { code = "EIO", message = ("%s on %s: no answer for it"):format(p, host) }
      end
    end
    return done, errs
  end

  -- h.remove_many(paths) -> { [path] = true | false }, { [path] = { code =, message = } }: each
  -- path removed as h.remove does it (a directory only when empty: ENOTEMPTY), in the order
  -- given, in one command. nil, err, CODE when the command itself failed (the host lost).
  function h.remove_many(paths)
    local input = nul_list(paths)
    if #paths == 0 then return {}, {} end
    local res, err, code = op("removes", {}, { stdin = input, max_capture = BATCH }, "remove")
    if not res then return nil, err, code end
    return outcomes(res.stdout, paths)
  end

  -- h.copy_many({ {src, dst}, ... }[, { under = root }]) -> { [dst] = true | false },
  -- { [dst] = { code =, message = } }: each as h.copy_atomic(src, dst, opts) does it, in one command.
  function h.copy_many(pairs_, o)
    if type(pairs_) ~= "table" then misuse("rr.hostfs.copy_many: expected a list of { src, dst }") end
    local root = under_of(o)
    local flat, dsts = {}, {}
    for _, pr in ipairs(pairs_) do
      if type(pr) ~= "table" then misuse("rr.hostfs.copy_many: expected a list of { src, dst }") end
      check_path(pr[2], "dst")
      check_under(root, pr[2])
      flat[#flat + 1], flat[#flat + 2] = pr[1], pr[2]
      dsts[#dsts + 1] = pr[2]
    end
    local input = nul_list(flat)
    if #flat == 0 then return {}, {} end
    local res, err, code = op("copies", { root }, { stdin = input, max_capture = BATCH }, "copy")
    if not res then return nil, err, code end
    return outcomes(res.stdout, dsts)
  end

  function h.exists(path, follow)
    local st, err, code = h.stat(path, follow)
    if st then return true end
    if code == "ENOENT" or code == "ENOTDIR" then return false end
    return nil, err, code
  end

  function h.list(dir)
    check_path(dir)
    local res, err, code = op("list", { dir }, { max_capture = 64 * 1024 * 1024 })
    if not res then return nil, err, code end
    local names = {}
    for name in res.stdout:gmatch("([^%z]+)%z") do names[#names + 1] = name end
    table.sort(names)
    return names
  end

  local function one_line(name, path)
    check_path(path)
    local res, err, code = op(name, { path })
    if not res then return nil, err, code end
    return (res.stdout:gsub("\n$", ""))
  end
  function h.realpath(path) return one_line("realpath", path) end
  function h.readlink(path) return one_line("readlink", path) end

  function h.sha256(path)
    local out, err, code = one_line("sha", path)
    if not out then return nil, err, code end
    return out:match("^(%x+)")
  end

  function h.statvfs(path)
    local out, err, code = one_line("statvfs", path)
    if not out then return nil, err, code end
    local frsize, bsize, blocks, free, avail, files, ffree = out:match("^(%d+) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+)$")
    if not frsize then return nil, ("%s on %s: cannot read its file system"):format(path, host), "EIO" end
    local f = math.tointeger(tonumber(frsize))
    return { size = f * math.tointeger(tonumber(blocks)), free = f * math.tointeger(tonumber(free)),
      avail = f * math.tointeger(tonumber(avail)), bsize = math.tointeger(tonumber(bsize)),
      files = math.tointeger(tonumber(files)), ffree = math.tointeger(tonumber(ffree)) }
  end

  local function done(res, err, code)
    if not res then return nil, err, code end
    return true
  end

  function h.mkdir_p(path, mode, o)
    check_path(path)
    local root = under_of(o)
    check_under(root, path)
    return done(op("mkdir", { path, octal(mode or 493), root }))
  end

  function h.remove(path, o)
    check_path(path)
    local root = under_of(o)
    check_under(root, path)
    return done(op("remove", { path, root }))
  end

  function h.rename(from, to, o)
    check_path(from, "from"); check_path(to, "to")
    local root = under_of(o)
    check_under(root, from); check_under(root, to)
    return done(op("rename", { from, to, root }))
  end

  function h.remove_tree(path, o)
    check_path(path)
    local root = under_of(o)
    check_under(root, path)
    local n = 0
    for _ in path:gsub("/+$", ""):gmatch("[^/]+") do n = n + 1 end
    if n < 2 or path:match("/%.%.?/*$") then
      return nil, ("refusing to remove %s on %s: too close to /"):format(path, host), "EPERM"
    end
    return done(op("rmtree", { path, root }))
  end

  function h.symlink(target, path)
    if type(target) ~= "string" or target == "" then misuse("rr.hostfs: symlink target must be a string") end
    check_path(path)
    return done(op("symlink", { target, path }, nil, path))
  end

  function h.fsync_dir(path)
    check_path(path)
    return done(op("fsyncdir", { path }))
  end

  function h.write_atomic(path, data, o)
    check_path(path)
    if type(data) ~= "string" then misuse("rr.hostfs.write_atomic: data must be a string") end
    local root = under_of(o)
    check_under(root, path)
    local sync = not (o and o.sync == false)
    return done(op("write", { path, octal(o and o.mode) or "", sync and "1" or "0", root, ("%d"):format(#data) },
      { stdin = data }, path))
  end

  function h.copy_atomic(src, dst, o)
    check_path(src, "src"); check_path(dst, "dst")
    local root = under_of(o)
    check_under(root, dst)
    return done(op("copy", { src, dst, octal(o and o.mode) or "", "1", root }, nil, dst))
  end

  -- The host's environment for the ssh user (its sessions' variables) and boot id, read once.
  function h.facts()
    if h._facts then return h._facts end
    local res, err, code = op("facts", {})
    if not res then return nil, err, code end
    local f = {}
    for k, v in res.stdout:gmatch("([%w_]+)=([^\n]*)\n") do f[k] = v end
    h._facts = f
    return f
  end

  local ENV = { HOME = "home", XDG_CONFIG_HOME = "xdg_config_home", XDG_RUNTIME_DIR = "xdg_runtime_dir",
    XDG_STATE_HOME = "xdg_state_home" }
  function h.getenv(name)
    local f = h.facts()
    local v = f and ENV[name] and f[ENV[name]]
    if v == "" then return nil end
    return v
  end

  return h
end

-- hostfs.state_root(handle, user) -> the state root on that host: /var/lib/rrengine, or with
-- user ${XDG_STATE_HOME:-$HOME/.local/state}/rrengine as the host's sessions see it.
function hostfs.state_root(h, user)
  if not user then return "/var/lib/rrengine" end
  local base = h.getenv("XDG_STATE_HOME")
  if not base or base == "" then
    base = (h.getenv("HOME") or "/tmp") .. "/.local/state"
  end
  return base .. "/rrengine"
end

return hostfs
