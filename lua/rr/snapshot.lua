-- rr.snapshot: known-good snapshots of a unit's definition (the unit file, its drop-ins, the
-- files its EnvironmentFile= names), so that rollback restores the definition that last
-- worked, not the operator's edit that broke it: an operator who edited the unit file before
-- the run expects rollback to bring back the version that worked, not to copy the broken edit
-- onto itself. The README's "What one restart does", step 2, and "Rollback".
--
-- On disk, per service, in <state_root>/snapshots/<service>/:
--     000007-<run>/            one complete snapshot: the stored copies and manifest.json
--     000008-<run>.tmp/        a snapshot being written (or left by a killed engine)
--     000002-<run>.trash/      a pruned snapshot being removed
--     current                  the name of the known-good snapshot, one line
-- A snapshot is written into its .tmp dir (each copy written to a temp name, fsynced and
-- renamed by rr.fs; the manifest last), the dir fsynced, then renamed into place and the
-- parent fsynced. Only then may `current` be replaced (write_atomic: temp, fsync, rename).
-- Everything below the state root is created and written without following a symlink (rr.fs's
-- `under`): a snapshots/ or snapshots/<service> that is a link to elsewhere is an error naming
-- it, and nothing is written through it.
-- A SIGKILL between any two steps leaves `current` naming the old complete snapshot or the
-- new complete one; .tmp and .trash dirs are never read and are removed by the next capture.
--
-- Decisions (docs/scripting.md, "rr.snapshot", has the API):
--   * capture stores a candidate; promote makes it the known-good one. The flow promotes
--     once a definition is known good: a flow of the service succeeded with it or, on the
--     service's first run, its pre-check passed and systemd runs what is on disk
--     (NeedDaemonReload=no).
--   * A symlinked unit file or drop-in is stored as the bytes systemd reads through it;
--     restore writes through the link (which stays a link) while it leads to the same
--     regular file as at capture, and otherwise replaces the link with the file.
--   * restore removes a drop-in added since (its presence alone changes the unit), and an
--     env file the snapshot recorded as absent. An env file the snapshot does not know at
--     all, older than the snapshot, is one the edited unit started to name, not one created
--     since: it may be shared, so it is kept (and reported), and the restored unit file no
--     longer names it.
--   * The last KEEP snapshots (and always the known-good one) are kept; older ones pruned.
--   * One service's rollback never touches a drop-in other units read too. A drop-in is the
--     service's OWN only when its directory is exactly "<unit>.d" (an instance's
--     "foo@bar.service.d" is its own; the template's "foo@.service.d" is shared by every
--     instance), it is not a vendor file (under /usr/lib, /lib or /usr/local/lib: a package
--     owns it) and not a generator's (/run/.../systemd/generator*/: rewritten at every
--     daemon-reload, putting one back changes nothing). Everything else is SHARED:
--     "service.d/" (every service), "<type>.d/", prefix directories ("lilith-.service.d/",
--     "lilith-sso-.service.d/"), an alias's directory. Such a drop-in is still captured (so
--     diff sees it change), but diff marks its change `shared = true` (scope "shared",
--     "vendor" or "generated") and restore neither writes, re-creates nor removes it: it
--     lists it in `manual`.
--     An own drop-in that is a symlink to a file outside its own directory (one conf linked
--     into several units' .d dirs) is replaced by a file on restore, never written through.
--   * The unit name comes from the manifest (capture's meta.unit, stored as snap.unit), or
--     restore/diff's opts.unit; for a snapshot taken without it, from the unit file's name
--     (FragmentPath; for a template "foo@.service", any "foo@<instance>.service.d" counts as
--     own). With no name at all, no drop-in is own: nothing is touched that might be shared.
local hostfs = require("rr.hostfs")
local state = require("rr.state")
local proc = require("rr.proc")
local cjson = require("cjson")

-- The module is made once per host (make(fs), fs an rr.hostfs handle): snapshot.on(handle) is the
-- same API acting on that host's files; snapshot itself is this machine's.
local function make(fs)
local snapshot = {}

snapshot.KEEP = 5

local MANIFEST = "manifest.json"
local CURRENT = "current"
local VERSION = 1
local ROLES = { unit = true, dropin = true, envfile = true }

local json = cjson.new()

local function perm(mode)
  return (mode or 0) & 4095
end

local function check_service(state_root, service, fname)
  if type(state_root) ~= "string" or state_root == "" then
    error(("rr.snapshot.%s: state_root must be a directory path"):format(fname), 3)
  end
  if type(service) ~= "string" or not service:match("^[%w][%w%._:@%-]*$") then
    error(("rr.snapshot.%s: invalid service name %s"):format(fname, tostring(service)), 3)
  end
end

local function check_files(files, fname)
  if type(files) ~= "table" then
    error(("rr.snapshot.%s: files must be a list of { path =, role = }"):format(fname), 3)
  end
  for i, f in ipairs(files) do
    if type(f) ~= "table" or type(f.path) ~= "string" or f.path:sub(1, 1) ~= "/" then
      error(("rr.snapshot.%s: files[%d] needs an absolute path"):format(fname, i), 3)
    end
    if not ROLES[f.role] then
      error(("rr.snapshot.%s: files[%d].role must be unit, dropin or envfile"):format(fname, i), 3)
    end
  end
end

local function service_dir(state_root, service)
  return ("%s/snapshots/%s"):format(state_root:gsub("/+$", ""), service)
end

-- Snapshot directory names: "<6-digit sequence>-<run id>", sortable by sequence.
local function parse_name(name)
  local seq, rest = name:match("^(%d+)%-(.*)$")
  if not seq then return nil end
  local kind = "complete"
  if rest:sub(-4) == ".tmp" then kind = "tmp" elseif rest:sub(-6) == ".trash" then kind = "trash" end
  return tonumber(seq), kind
end

local function now_rfc3339()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

-- The file a path stands for: itself, or what it links to (nil, err when that is missing).
-- Returns path, stat.
local function resolve(path)
  local st, err, code = fs.stat(path)
  if not st then return nil, err, code end
  if st.type == "link" then
    local real, rerr, rcode = fs.realpath(path)
    if not real then return nil, rerr, rcode end
    st, err, code = fs.stat(real)
    if not st then return nil, err, code end
    return real, st
  end
  return path, st
end

-- Reads and checks <dir>/manifest.json -> snap (the manifest with .dir) or nil, err.
local function load_dir(dir)
  local data, err = fs.read(dir .. "/" .. MANIFEST)
  if not data then return nil, ("no manifest in %s: %s"):format(dir, tostring(err)) end
  local ok, snap = pcall(json.decode, data)
  if not ok or type(snap) ~= "table" or snap.version ~= VERSION or type(snap.files) ~= "table" then
    return nil, ("the manifest in %s is not a snapshot manifest"):format(dir)
  end
  -- cjson reads every number as a float; sizes, modes and ids are integers.
  for _, e in ipairs(snap.files) do
    for _, key in ipairs({ "size", "mode", "uid", "gid" }) do
      if e[key] ~= nil then e[key] = math.tointeger(e[key]) end
    end
  end
  snap.created_epoch = math.tointeger(snap.created_epoch) or snap.created_epoch
  snap.dir = dir
  return snap
end

-- Complete snapshots of a service, oldest first: { {seq =, name =}, ... }.
local function complete_entries(dir)
  local entries = {}
  for _, name in ipairs(fs.list(dir) or {}) do
    local seq, kind = parse_name(name)
    if seq and kind == "complete" then
      entries[#entries + 1] = { seq = seq, name = name }
    end
  end
  table.sort(entries, function(a, b) return a.seq < b.seq end)
  return entries
end

local function read_current(dir)
  local data = fs.read(dir .. "/" .. CURRENT)
  if not data then return nil end
  local name = data:match("^%s*(.-)%s*$")
  if name == "" or name:find("/", 1, true) then return nil end
  return name
end

-- Leftovers of a killed engine: half-written .tmp dirs, half-removed .trash dirs, and the
-- temp file of an interrupted write_atomic of `current` (".current.XXXXXX"). The run lock
-- keeps any other writer out while this runs.
local function remove_leftovers(state_root, dir)
  for _, name in ipairs(fs.list(dir) or {}) do
    local seq, kind = parse_name(name)
    if seq and kind ~= "complete" then
      fs.remove_tree(dir .. "/" .. name, state.under(state_root))
    elseif name:match("^%.current%.[%w]+$") then
      fs.remove(dir .. "/" .. name, state.under(state_root))
    end
  end
end

local function next_seq(dir)
  local max = 0
  for _, name in ipairs(fs.list(dir) or {}) do
    local seq = parse_name(name)
    if seq and seq > max then max = seq end
  end
  return max + 1
end

-- snapshot.list(state_root, service) -> { snap, ... } oldest first: the complete snapshots
-- (a dir whose manifest does not load is left out).
function snapshot.list(state_root, service)
  check_service(state_root, service, "list")
  local dir = service_dir(state_root, service)
  local out = {}
  for _, e in ipairs(complete_entries(dir)) do
    local snap = load_dir(dir .. "/" .. e.name)
    if snap then out[#out + 1] = snap end
  end
  return out
end

-- snapshot.prune(state_root, service[, keep]) -> number removed: keeps the newest `keep`
-- snapshots and the known-good one. A pruned dir is first renamed to .trash (one atomic
-- step), so a crash in the middle of its removal never leaves a half snapshot under a
-- complete name.
function snapshot.prune(state_root, service, keep)
  check_service(state_root, service, "prune")
  keep = keep or snapshot.KEEP
  local dir = service_dir(state_root, service)
  local current = read_current(dir)
  local entries = complete_entries(dir)
  local removed = 0
  for i = 1, #entries - keep do
    local name = entries[i].name
    if name ~= current and state.discard(dir .. "/" .. name, dir .. "/" .. name .. ".trash", state_root, fs) then
      removed = removed + 1
    end
  end
  return removed
end

-- A run id as part of a directory name.
local function name_part(run)
  local s = tostring(run or "run"):gsub("[^%w%._-]", "_"):sub(1, 64)
  return s == "" and "run" or s
end

-- Copies the definition files into the snapshot dir (below state_root) -> manifest entries | nil,
-- err. In batches (on a remote host each call is a command there): their stats, the copies, the
-- hashes and sizes of the copies; a symlink or a missing file is resolved on its own.
local function store_files(state_root, tmp, list)
  local paths = {}
  for i, f in ipairs(list) do paths[i] = f.path end
  local lst = fs.stat_many(paths) or {}
  local entries, copies, pending = {}, {}, {}
  for i, f in ipairs(list) do
    local entry = { path = f.path, role = f.role, optional = f.optional == true }
    local source, st, code
    if lst[f.path] and lst[f.path].type ~= "link" then
      source, st = f.path, lst[f.path]
    else
      source, st, code = resolve(f.path)
    end
    if not source then
      if not (code == "ENOENT" and f.optional) then
        return nil, ("cannot snapshot %s: %s"):format(f.path, tostring(st))
      end
      entry.absent = true
    elseif st.type ~= "file" then
      return nil, ("cannot snapshot %s: not a regular file"):format(f.path)
    else
      if source ~= f.path then entry.link = source end
      entry.stored = ("%02d.%s"):format(i, f.role)
      entry.mode, entry.uid, entry.gid = perm(st.mode), st.uid, st.gid
      copies[#copies + 1] = { source, tmp .. "/" .. entry.stored }
      pending[#pending + 1] = entry
    end
    entries[i] = entry
  end
  local copied, cerrs = fs.copy_many(copies, state.under(state_root))
  if not copied then return nil, ("cannot copy the definition into the snapshot: %s"):format(tostring(cerrs)) end
  local stored = {}
  for k, pr in ipairs(copies) do
    if not copied[pr[2]] then
      return nil, ("cannot copy %s into the snapshot: %s"):format(pending[k].path, cerrs[pr[2]].message)
    end
    stored[k] = pr[2]
  end
  -- The hash and size of each copy: the bytes restore will write.
  local sums, serr = fs.sha256_many(stored)
  local sts = fs.stat_many(stored) or {}
  for k, entry in ipairs(pending) do
    local sum, copy = sums and sums[stored[k]], sts[stored[k]]
    if not sum or not copy then
      return nil, ("cannot read back the copy of %s: %s"):format(entry.path,
        tostring(sums and serr[stored[k]] or serr or "missing"))
    end
    entry.sha256, entry.size = sum, copy.size
  end
  return entries
end

-- snapshot.capture(state_root, service, files, meta) -> snap | nil, err. Stores a candidate
-- snapshot of `files` ({ path =, role = "unit"|"dropin"|"envfile", optional = bool }); meta.run
-- names the run, meta.unit the systemd unit (snap.unit: which drop-ins are the unit's own,
-- see the decisions above). Does not change the known-good one: see snapshot.promote.
function snapshot.capture(state_root, service, files, meta)
  check_service(state_root, service, "capture")
  check_files(files, "capture")
  if meta ~= nil and type(meta) ~= "table" then
    error("rr.snapshot.capture: meta must be a table", 2)
  end
  meta = meta or {}
  if meta.unit ~= nil and (type(meta.unit) ~= "string" or meta.unit == "" or meta.unit:find("/", 1, true)) then
    error("rr.snapshot.capture: meta.unit must be a unit name (a string without \"/\")", 2)
  end
  local dir = service_dir(state_root, service)
  local under = state.under(state_root)
  local ok, err = fs.mkdir_p(dir, 448, under)
  if not ok then
    return nil, ("cannot create %s: %s"):format(dir, tostring(err))
  end
  remove_leftovers(state_root, dir)

  local name = ("%06d-%s"):format(next_seq(dir), name_part(meta.run))
  local tmp = dir .. "/" .. name .. ".tmp"
  ok, err = fs.mkdir_p(tmp, 448, under)
  if not ok then
    return nil, ("cannot create %s: %s"):format(tmp, tostring(err))
  end
  local function fail(msg)
    fs.remove_tree(tmp, under)
    return nil, msg
  end

  local list, seen = {}, {}
  for _, f in ipairs(files) do
    if not seen[f.path] then
      seen[f.path] = true
      list[#list + 1] = f
    end
  end
  local entries, serr = store_files(state_root, tmp, list)
  if not entries then return fail(serr) end

  local snap = {
    version = VERSION,
    service = service,
    name = name,
    run = meta.run,
    unit = meta.unit,
    created = now_rfc3339(),
    created_epoch = os.time(),
    meta = meta,
    files = entries,
  }
  local eok, data = pcall(json.encode, snap)
  if not eok then
    return fail("cannot encode the snapshot manifest (meta must be plain data): " .. tostring(data))
  end
  ok, err = fs.write_atomic(tmp .. "/" .. MANIFEST, data .. "\n", { mode = 384, under = under.under })
  if not ok then return fail("cannot write the snapshot manifest: " .. tostring(err)) end
  ok, err = fs.fsync_dir(tmp)
  if not ok then return fail("cannot sync " .. tmp .. ": " .. tostring(err)) end
  local final = dir .. "/" .. name
  ok, err = fs.rename(tmp, final, under)
  if not ok then return fail(("cannot rename %s into place: %s"):format(tmp, tostring(err))) end
  ok, err = fs.fsync_dir(dir)
  if not ok then return nil, "cannot sync " .. dir .. ": " .. tostring(err) end
  snap.dir = final
  snapshot.prune(state_root, service)
  return snap
end

-- Checks that every stored copy is there with the bytes its manifest names.
local function verify(snap)
  local paths = {}
  for _, e in ipairs(snap.files) do
    if not e.absent then paths[#paths + 1] = snap.dir .. "/" .. e.stored end
  end
  -- one batch call (on a remote host, one command there)
  local sums = fs.sha256_many(paths) or {}
  for _, e in ipairs(snap.files) do
    if not e.absent then
      local sum = sums[snap.dir .. "/" .. e.stored]
      if sum ~= e.sha256 then
        return nil, ("the snapshot %s is damaged: %s does not match its hash"):format(snap.dir, e.stored)
      end
    end
  end
  return true
end

-- snapshot.promote(state_root, service, snap) -> snap | nil, err: makes a captured snapshot
-- the known-good one.
function snapshot.promote(state_root, service, snap)
  check_service(state_root, service, "promote")
  if type(snap) ~= "table" or type(snap.name) ~= "string" then
    error("rr.snapshot.promote: snap must be a snapshot from snapshot.capture", 2)
  end
  local dir = service_dir(state_root, service)
  local on_disk, err = load_dir(dir .. "/" .. snap.name)
  if not on_disk then return nil, err end
  local ok, verr = verify(on_disk)
  if not ok then return nil, verr end
  ok, err = fs.write_atomic(dir .. "/" .. CURRENT, snap.name .. "\n", { mode = 384, under = state.under(state_root).under })
  if not ok then return nil, "cannot write " .. dir .. "/" .. CURRENT .. ": " .. tostring(err) end
  ok, err = fs.fsync_dir(dir)
  if not ok then return nil, "cannot sync " .. dir .. ": " .. tostring(err) end
  snapshot.prune(state_root, service)
  return on_disk
end

-- snapshot.known_good(state_root, service) -> snap | nil, reason.
function snapshot.known_good(state_root, service)
  check_service(state_root, service, "known_good")
  local dir = service_dir(state_root, service)
  local name = read_current(dir)
  if not name then
    return nil, ("no known-good snapshot of %s"):format(service)
  end
  return load_dir(dir .. "/" .. name)
end

-- Does the file on disk differ from the stored entry? -> nil (same) | "content"|"mode"|"owner"
-- sums: { [path] = sha256 } read beforehand, if any.
local function difference(entry, st, path, sums)
  if st.size ~= entry.size then return "content" end
  local sum = sums and sums[path]
  if sum == nil then sum = fs.sha256(path) end
  if sum ~= entry.sha256 then return "content" end
  if perm(st.mode) ~= entry.mode then return "mode" end
  if st.uid ~= entry.uid or st.gid ~= entry.gid then return "owner" end
  return nil
end

local function parent(path)
  return path:match("^(.*)/[^/]*$") or "/"
end

local function basename(path)
  return path:match("([^/]*)$")
end

-- Package-owned locations: a drop-in there belongs to a package, not to the operator.
local VENDOR_PREFIXES = { "/usr/lib/", "/lib/", "/usr/local/lib/" }

local function is_vendor(path)
  for _, prefix in ipairs(VENDOR_PREFIXES) do
    if path:sub(1, #prefix) == prefix then return true end
  end
  return false
end

-- A function(dir_name) -> bool telling whether a drop-in directory is the unit's own, from
-- the unit's name, or else from the unit file's name (a template's: any instance dir).
local function own_dir_test(unit, fragment)
  if type(unit) == "string" and unit ~= "" then
    local own = unit .. ".d"
    return function(name) return name == own end
  end
  if type(fragment) ~= "string" then
    return function() return false end
  end
  local base = basename(fragment)
  local prefix, suffix = base:match("^([^@]+)@%.([^.@]+)$")
  if prefix then
    local head, tail = prefix .. "@", "." .. suffix .. ".d"
    return function(name)
      return #name > #head + #tail and name:sub(1, #head) == head and name:sub(-#tail) == tail
    end
  end
  local own = base .. ".d"
  return function(name) return name == own end
end

-- The own-dir test for a snapshot (opts.unit first, then the manifest, then the unit file).
local function own_test_for(snap, opts)
  local unit = opts and opts.unit or snap.unit or (type(snap.meta) == "table" and snap.meta.unit) or nil
  local fragment
  for _, e in ipairs(snap.files) do
    if e.role == "unit" then fragment = e.path break end
  end
  return own_dir_test(unit, fragment)
end

-- Written by a generator at every daemon-reload ("/run/systemd/generator.late/...", and the
-- user manager's "/run/user/UID/systemd/generator/..."): putting one back changes nothing.
local function is_generated(path)
  return path:find("/systemd/generator/", 1, true) ~= nil or path:find("/systemd/generator%.early/") ~= nil
    or path:find("/systemd/generator%.late/") ~= nil
end

-- "own" | "shared" | "vendor" | "generated" for a drop-in path, given the own-dir test.
local function scope_of(path, own_test)
  if is_vendor(path) then return "vendor" end
  if is_generated(path) then return "generated" end
  if own_test(basename(parent(path))) then return "own" end
  return "shared"
end

-- snapshot.dropin_scope(path, unit) -> "own" | "shared" | "vendor" | "generated": whose drop-in `path` is,
-- for the unit named `unit` (see the decisions at the top). nil unit: never "own".
function snapshot.dropin_scope(path, unit)
  if type(path) ~= "string" then
    error("rr.snapshot.dropin_scope: path must be a string", 2)
  end
  if unit ~= nil and type(unit) ~= "string" then
    error("rr.snapshot.dropin_scope: unit must be a unit name (string) or nil", 2)
  end
  return scope_of(path, own_dir_test(unit, nil))
end

local function check_opts(opts, fname)
  if opts ~= nil and (type(opts) ~= "table" or (opts.unit ~= nil and type(opts.unit) ~= "string")) then
    error(("rr.snapshot.%s: opts must be a table { unit = NAME }"):format(fname), 3)
  end
end

-- snapshot.diff(snap, current_files[, opts]) -> { {path =, role =, change = "modified"|"added"|
-- "removed", detail =, shared = true|nil, scope = "shared"|"vendor"|"generated"|nil}, ... }: the snapshot
-- against the files on disk now. current_files is what systemd names now; files the snapshot
-- has are checked whether systemd names them or not. A change of a drop-in that is not the
-- unit's own carries shared = true: restore leaves it alone (opts.unit: see the decisions).
function snapshot.diff(snap, current_files, opts)
  if type(snap) ~= "table" or type(snap.files) ~= "table" then
    error("rr.snapshot.diff: snap must be a snapshot", 2)
  end
  current_files = current_files or {}
  check_files(current_files, "diff")
  check_opts(opts, "diff")
  local own_test = own_test_for(snap, opts)
  local changes, known = {}, {}
  local function add(c)
    if c.role == "dropin" then
      local scope = scope_of(c.path, own_test)
      if scope ~= "own" then c.shared, c.scope = true, scope end
    end
    changes[#changes + 1] = c
  end
  -- In batches (on a remote host each call is a command there): the stats, then the hashes of
  -- the files that have their recorded size; a symlink or a missing file resolved on its own.
  local paths = {}
  for i, e in ipairs(snap.files) do paths[i] = e.path end
  local lst = fs.stat_many(paths) or {}
  local found, hash = {}, {}
  for _, e in ipairs(snap.files) do
    local l = lst[e.path]
    local path, st
    if l and l.type ~= "link" then path, st = e.path, l else path, st = resolve(e.path) end
    found[e.path] = { path, st }
    if path and not e.absent and st.type == "file" and st.size == e.size then hash[#hash + 1] = path end
  end
  local sums = fs.sha256_many(hash) or {}
  for _, e in ipairs(snap.files) do
    known[e.path] = true
    local path, st = found[e.path][1], found[e.path][2]
    if e.absent then
      if path then
        add({ path = e.path, role = e.role, change = "added", detail = "absent in the snapshot" })
      end
    elseif not path then
      add({ path = e.path, role = e.role, change = "removed" })
    elseif st.type ~= "file" then
      add({ path = e.path, role = e.role, change = "modified", detail = "not a regular file" })
    else
      local what = difference(e, st, path, sums)
      if what then
        add({ path = e.path, role = e.role, change = "modified", detail = what })
      end
    end
  end
  local others = {}
  for _, f in ipairs(current_files) do
    if not known[f.path] then others[#others + 1] = f.path end
  end
  local there = fs.stat_many(others) or {}
  for _, f in ipairs(current_files) do
    if not known[f.path] then
      known[f.path] = true
      if there[f.path] then
        add({ path = f.path, role = f.role, change = "added" })
      end
    end
  end
  return changes
end

local function entry_of(snap, path)
  for _, e in ipairs(snap.files) do
    if e.path == path then return e end
  end
  return nil
end

-- Puts the stored copy of `entry` back at its path. Through a symlink only when it still
-- leads to the regular file it led to at capture (for a drop-in: a file in the drop-in's own
-- directory; a conf linked in from elsewhere may be read by other units too); any other link
-- (repointed, dangling, to /dev/null as a mask) is replaced by the file itself: systemd then
-- reads the same bytes, and nothing outside the definition is written.
local function put_back(snap, entry)
  local dest = entry.path
  local st = fs.stat(dest)
  if st and st.type == "link" and entry.link then
    local real = fs.realpath(dest)
    local target = real and fs.stat(real)
    local private = entry.role ~= "dropin" or parent(entry.link) == (fs.realpath(parent(entry.path)) or parent(entry.path))
    if real == entry.link and target and target.type == "file" and private then
      dest = real
    end
  end
  local dir = parent(dest)
  if not fs.stat(dir) then
    local ok, err = fs.mkdir_p(dir, 493)
    if not ok then return nil, ("cannot create %s: %s"):format(dir, tostring(err)) end
  end
  local ok, err = fs.copy_atomic(snap.dir .. "/" .. entry.stored, dest)
  if not ok then return nil, ("cannot restore %s: %s"):format(entry.path, tostring(err)) end
  if fs.sha256(dest) ~= entry.sha256 then
    return nil, ("restored %s does not match the snapshot's hash"):format(entry.path)
  end
  return true
end

-- snapshot.restore(snap, current_files[, opts]) -> { restored = {paths}, removed = {paths},
-- kept = {paths}, manual = {paths} } | nil, err, partial. Only what differs is touched, and
-- only the unit's own files: a shared or vendor drop-in that differs from the snapshot
-- (modified, removed or added since) is left as it is and listed in `manual` — putting it
-- back would change every other unit that reads it; an operator decides. opts.unit names the
-- unit when the snapshot does not (see the decisions at the top). Run daemon-reload after.
function snapshot.restore(snap, current_files, opts)
  if type(snap) ~= "table" or type(snap.files) ~= "table" or type(snap.dir) ~= "string" then
    error("rr.snapshot.restore: snap must be a snapshot", 2)
  end
  check_opts(opts, "restore")
  local changes = snapshot.diff(snap, current_files, opts)
  local result = { restored = {}, removed = {}, kept = {}, manual = {} }
  local problems = {}
  for _, c in ipairs(changes) do
    local entry = entry_of(snap, c.path)
    if c.shared then
      result.manual[#result.manual + 1] = c.path
    elseif c.change == "added" then
      local st = fs.stat(c.path)
      local newer = not st or not snap.created_epoch or (st.mtime or 0) >= snap.created_epoch
      if c.role == "envfile" and not entry and not newer then
        result.kept[#result.kept + 1] = c.path
      else
        local ok, err = fs.remove(c.path)
        if ok then
          result.removed[#result.removed + 1] = c.path
        else
          problems[#problems + 1] = ("cannot remove %s: %s"):format(c.path, tostring(err))
        end
      end
    else
      local ok, err = put_back(snap, entry)
      if ok then
        result.restored[#result.restored + 1] = c.path
      else
        problems[#problems + 1] = err
      end
    end
  end
  if #problems > 0 then
    return nil, table.concat(problems, "; "), result
  end
  return result
end

---------------------------------------------------------------------------------------------
-- Unified diff (for --diff and the dry run): diff(1) -u from the stored copy to the file now.

-- More lines than this are cut (the last line says how to see it all).
snapshot.DIFF_MAX_LINES = 500

-- snapshot.unified_diff(snap, path[, {max_lines = N}]) -> text ("" when the same) | nil, err:
-- from the known-good copy of `path` to the file on disk now. A side that does not exist is
-- /dev/null. GNU diff writes it (LC_ALL=C, so its own lines are not translated); the labels
-- put "(known good, run R)" and "(now)" after the path, tab-separated as patch(1) expects.
function snapshot.unified_diff(snap, path, opts)
  if type(snap) ~= "table" or type(snap.files) ~= "table" or type(snap.dir) ~= "string" then
    error("rr.snapshot.unified_diff: snap must be a snapshot", 2)
  end
  if type(path) ~= "string" then
    error("rr.snapshot.unified_diff: path must be a string", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("rr.snapshot.unified_diff: opts must be a table", 2)
  end
  local max_lines = opts and opts.max_lines or snapshot.DIFF_MAX_LINES
  if math.type(max_lines) ~= "integer" or max_lines < 1 then
    error("rr.snapshot.unified_diff: opts.max_lines must be an integer >= 1", 2)
  end
  local entry = entry_of(snap, path)
  local old = (entry and not entry.absent) and (snap.dir .. "/" .. entry.stored) or nil
  local new, st = resolve(path)
  -- diff would compare against DIR/<name> for a directory, and wait forever on a FIFO.
  if new and st.type ~= "file" then
    return nil, ("cannot diff %s: it is a %s, not a regular file"):format(path, st.type), "EINVAL"
  end
  local old_label = ("%s\t(known good%s)"):format(old and path or "/dev/null",
    snap.run and (", run " .. tostring(snap.run)) or "")
  local new_label = (new and path or "/dev/null") .. "\t(now)"
  local argv = { "diff", "-u", "--label", old_label, "--label", new_label, "--",
    old or "/dev/null", new or "/dev/null" }
  local res, err, code, r = proc.run(argv, { env = { LC_ALL = "C" }, timeout = 30 })
  -- diff: 0 the same, 1 different, 2 trouble (a file it cannot read).
  if not res and not (r and r.exit_code == 1) then
    local why = r and r.stderr:match("[^\n]+") or err
    return nil, ("cannot diff %s against its known-good copy: %s"):format(path, tostring(why)),
      r and "EIO" or code
  end
  res = res or r
  if res.exit_code == 0 then
    -- diff sees no difference between /dev/null and an empty file; their presence differs.
    return (old == nil) ~= (new == nil) and ("--- %s\n+++ %s\n"):format(old_label, new_label) or ""
  end
  local lines, count = {}, 0
  for line in res.stdout:gmatch("[^\n]*\n?") do
    if line == "" then break end
    count = count + 1
    if count <= max_lines then lines[count] = line end
  end
  if count > max_lines or res.truncated.stdout then
    -- max_capture may have cut the last line kept
    if lines[#lines] and lines[#lines]:sub(-1) ~= "\n" then lines[#lines] = lines[#lines] .. "\n" end
    lines[#lines + 1] = ("... (diff cut at %d lines; all of it: diff -u %s %s)\n"):format(
      math.min(count, max_lines), old or "/dev/null", new or "/dev/null")
  end
  return table.concat(lines)
end

return snapshot
end

-- snapshot.on(handle) -> the module acting on the files of handle's host (rr.hostfs).
local snapshot = hostfs.per_host(make)

return snapshot
