-- rr.state: where a manager's run state lives and the life cycle of what the engine keeps
-- there. One place for the paths, for "is this the same directory", and for the deploy
-- pointers, so that the flow, a manual rollback, recovery and pruning agree.
--
-- The state root (/var/lib/rrengine, or $XDG_STATE_HOME/rrengine for the user manager) holds:
--     run.lock                 the run lock (flock; names the holder's PID)
--     run.journal              the journal of a run in progress (rr.journal)
--     events.jsonl             the event log (user manager; /var/log/rrengine for the system)
--     snapshots/<svc>/         known-good definitions (rr.snapshot)
--     runs/<run>/<svc>/        one deploy record and its backups (rr.deploy)
--     deploys/<svc>.inflight   names the record of a deploy whose flow has not ended
--     deploys/<svc>.last       names the record of the last deploy whose flow succeeded
--     bluegreen/<svc>.live     the live colour of a blue-green service ("blue" or "green")
--
-- A deploy record is named by the pointers through three verbs, and nothing else writes them:
--     begin   before rsync runs: <svc>.inflight names the record. Refused while .inflight names
--             another record that was never undone: that is the only trace of an unfinished
--             deploy, and overwriting it would make the release impossible to undo.
--     commit  the flow succeeded: .inflight becomes .last (one rename).
--     undone  the deploy was undone: every pointer naming that record goes.
--
-- The root itself may be a symlink (an operator keeps it on another disk); nothing the engine
-- creates or writes below it is ever reached through one: every write here goes through rr.fs's
-- `under = root` (state.under(root)), and a symlinked deploys/ is an error naming it, nothing
-- touched.
--
-- Every function that touches files takes, last and optional, the rr.hostfs handle of the host
-- the root is on (default: this machine's rr.fs).
local rrfs = require("rr.fs")

local state = {}

local KINDS = { inflight = true, last = true }

-- state.root(user) -> the state root of the system manager or of the calling user's manager.
function state.root(user)
  if user then
    local base = os.getenv("XDG_STATE_HOME")
    if not base or base == "" then
      base = (os.getenv("HOME") or "/tmp") .. "/.local/state"
    end
    return base .. "/rrengine"
  end
  return "/var/lib/rrengine"
end

-- state.events_file(user) -> the default event log.
function state.events_file(user)
  if user then
    return state.root(true) .. "/events.jsonl"
  end
  return "/var/log/rrengine/events.jsonl"
end

local function strip(path)
  local p = path:match("^%s*(.-)%s*$"):gsub("/+$", "")
  if p == "" then p = "/" end
  return p
end

function state.lock_path(root) return strip(root) .. "/run.lock" end
function state.journal_path(root) return strip(root) .. "/run.journal" end
function state.runs_dir(root) return strip(root) .. "/runs" end

-- state.under(root) -> the options that keep an rr.fs write below root off symlinks: pass them
-- (or add `under = strip(root)` to other options) for every path the engine writes in the root.
function state.under(root)
  return { under = strip(root) }
end

-- state.record_dir(root, run, service) -> where one deploy's record and backups go.
function state.record_dir(root, run, service)
  return ("%s/runs/%s/%s"):format(strip(root), run, service)
end

-- state.canonical(path[, fs]) -> the one form in which two paths are compared everywhere: trimmed,
-- without trailing slashes, symlinks resolved when the path exists.
function state.canonical(path, fs)
  fs = fs or rrfs
  local p = strip(path)
  return fs.realpath(p) or p
end

-- state.same_path(a, b) -> true when both name the same directory (nil never matches).
function state.same_path(a, b, fs)
  if a == nil or b == nil then return false end
  return state.canonical(a, fs) == state.canonical(b, fs)
end

local function check(root, service, kind, fname)
  if type(root) ~= "string" or root == "" then
    error(("rr.state.%s: the state root must be a directory path"):format(fname), 3)
  end
  if type(service) ~= "string" or not service:match("^[%w][%w%._:@%-]*$") then
    error(("rr.state.%s: invalid service name %s"):format(fname, tostring(service)), 3)
  end
  if kind ~= nil and not KINDS[kind] then
    error(("rr.state.%s: kind must be \"inflight\" or \"last\", got %s"):format(fname, tostring(kind)), 3)
  end
end

local function pointer_path(root, service, kind)
  return ("%s/deploys/%s.%s"):format(strip(root), service, kind)
end

-- state.pointer(root, service, kind) -> the path of the "inflight" or "last" pointer.
function state.pointer(root, service, kind)
  check(root, service, kind, "pointer")
  return pointer_path(root, service, kind)
end

-- state.read_pointer(root, service, kind) -> record dir | nil, message, CODE ("ENOENT": no such
-- pointer; "EINVAL": it is empty).
function state.read_pointer(root, service, kind, fs)
  fs = fs or rrfs
  check(root, service, kind, "read_pointer")
  local path = pointer_path(root, service, kind)
  local data, err, code = fs.read(path)
  if not data then return nil, err, code end
  local dir = data:match("^%s*(.-)%s*$")
  if dir == "" then return nil, ("the deploy pointer %s is empty"):format(path), "EINVAL" end
  return (dir:gsub("/+$", ""))
end

-- state.write_pointer(root, service, kind, dir) -> true | nil, message, CODE: atomically (temp,
-- fsync, rename, fsync of deploys/). Low level: the flow uses begin/commit/undone; tools and
-- specs use this to set a pointer by hand.
function state.write_pointer(root, service, kind, dir, fs)
  fs = fs or rrfs
  check(root, service, kind, "write_pointer")
  if type(dir) ~= "string" or dir == "" then
    error("rr.state.write_pointer: dir must be a path (string)", 2)
  end
  local parent = strip(root) .. "/deploys"
  local ok, err, code = fs.mkdir_p(parent, 448, state.under(root))
  if not ok then return nil, ("cannot create %s: %s"):format(parent, tostring(err)), code end
  ok, err, code = fs.write_atomic(pointer_path(root, service, kind), dir .. "\n", { mode = 384, under = strip(root) })
  if not ok then return nil, tostring(err), code end
  return true
end

-- state.remove_pointer(root, service, kind) -> true | nil, message, CODE (no pointer: true).
function state.remove_pointer(root, service, kind, fs)
  fs = fs or rrfs
  check(root, service, kind, "remove_pointer")
  local ok, err, code = fs.remove(pointer_path(root, service, kind), state.under(root))
  if not ok and code ~= "ENOENT" then return nil, tostring(err), code end
  fs.fsync_dir(strip(root) .. "/deploys")
  return true
end

-- Is the deploy recorded in dir finished with (undone, or never started changing files)?
local function record_settled(dir, fs)
  local data = fs.read(dir .. "/deploy.json")
  if not data then
    -- no record and no backup: the deploy never started changing files
    return not fs.exists(dir .. "/backup")
  end
  return data:find('"state"%s*:%s*"undone"') ~= nil
end

-- state.deploy_begin(root, service, dir) -> true | nil, message, "EUNFINISHED" | nil, message, CODE
function state.deploy_begin(root, service, dir, fs)
  fs = fs or rrfs
  check(root, service, nil, "deploy_begin")
  local named = state.read_pointer(root, service, "inflight", fs)
  if named and not state.same_path(named, dir, fs) and not record_settled(named, fs) then
    return nil, ("an earlier deploy of %s did not finish (%s names %s): undo it first"):format(
      service, pointer_path(root, service, "inflight"), named), "EUNFINISHED"
  end
  return state.write_pointer(root, service, "inflight", dir, fs)
end

-- state.deploy_commit(root, service, dir) -> true | nil, message, CODE: the deploy recorded in
-- dir became the last good one.
function state.deploy_commit(root, service, dir, fs)
  fs = fs or rrfs
  check(root, service, nil, "deploy_commit")
  local named = state.read_pointer(root, service, "inflight", fs)
  if not state.same_path(named, dir, fs) then
    -- the pointer is not this deploy's: write .last directly, leave .inflight alone
    return state.write_pointer(root, service, "last", dir, fs)
  end
  local ok, err, code = fs.rename(pointer_path(root, service, "inflight"), pointer_path(root, service, "last"),
    state.under(root))
  if not ok then return nil, tostring(err), code end
  fs.fsync_dir(strip(root) .. "/deploys")
  return true
end

-- state.deploy_undone(root, service, dir) -> true | nil, message, CODE: every pointer naming
-- dir is removed (a pointer naming another record stays).
function state.deploy_undone(root, service, dir, fs)
  fs = fs or rrfs
  check(root, service, nil, "deploy_undone")
  for kind in pairs(KINDS) do
    if state.same_path(state.read_pointer(root, service, kind, fs), dir, fs) then
      local ok, err, code = state.remove_pointer(root, service, kind, fs)
      if not ok then return nil, err, code end
    end
  end
  return true
end

-- The live colour of a blue-green service: written once a switch is done (and again when a
-- switch is undone), fsynced with its directory: after a power cut the record never names a
-- colour that traffic had not reached.
local COLOURS = { blue = true, green = true }

local function live_path(root, service)
  return ("%s/bluegreen/%s.live"):format(strip(root), service)
end

-- state.live_colour(root, service[, fs]) -> "blue" | "green" | nil, message, CODE ("ENOENT":
-- none recorded; "EBADMSG": the record holds something else).
function state.live_colour(root, service, fs)
  fs = fs or rrfs
  check(root, service, nil, "live_colour")
  local path = live_path(root, service)
  local data, err, code = fs.read(path)
  if not data then return nil, err, code end
  local colour = data:match("^%s*(.-)%s*$")
  if not COLOURS[colour] then
    return nil, ("%s holds %q, not blue or green"):format(path, colour), "EBADMSG"
  end
  return colour
end

-- state.set_live_colour(root, service, colour[, fs]) -> true | nil, message, CODE: atomically
-- and durably (temp, fsync, rename, fsync of bluegreen/).
function state.set_live_colour(root, service, colour, fs)
  fs = fs or rrfs
  check(root, service, nil, "set_live_colour")
  if not COLOURS[colour] then
    error(("rr.state.set_live_colour: colour must be \"blue\" or \"green\", got %s"):format(tostring(colour)), 2)
  end
  local parent = strip(root) .. "/bluegreen"
  local ok, err, code = fs.mkdir_p(parent, 448, state.under(root))
  if not ok then return nil, ("cannot create %s: %s"):format(parent, tostring(err)), code end
  ok, err, code = fs.write_atomic(live_path(root, service), colour .. "\n", { mode = 384, under = strip(root) })
  if not ok then return nil, tostring(err), code end
  return true
end

-- state.discard(dir, trash[, root]) -> true | nil, message, CODE: removes a stored directory so
-- that a crash never leaves half of it under its own name: one rename to `trash` (fsynced), then
-- the removal. A leftover trash from an earlier crash is removed first. root: the state root both
-- lie under (nothing below it is followed through a symlink).
function state.discard(dir, trash, root, fs)
  fs = fs or rrfs
  local opts = root and state.under(root) or nil
  fs.remove_tree(trash, opts)
  local ok, err, code = fs.rename(dir, trash, opts)
  if not ok then return nil, ("cannot remove %s: %s"):format(dir, tostring(err)), code end
  fs.fsync_dir(dir:match("^(.*)/[^/]+$") or ".")
  ok, err, code = fs.remove_tree(trash, opts)
  if not ok then return nil, ("cannot remove %s: %s"):format(trash, tostring(err)), code end
  return true
end

return state
