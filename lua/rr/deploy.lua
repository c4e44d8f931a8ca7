-- rr.deploy: a code deploy (rsync from a deploy path into a service's working dir) that can
-- be undone exactly, later, by another process: a rollback undoes the deploy, not the
-- service's own writes (files the deploy created are removed, files it replaced or deleted
-- come back byte-identical, files the service writes at run time are left alone). The
-- README's "What one restart does", step 3, and "Rollback".
--
-- How the undo is made exact:
--   * rsync --backup --backup-dir=<state_dir>/backup moves every file the deploy REPLACES or
--     DELETES into the backup dir, under its relative path. rsync writes a new file to a
--     temp name and renames it over the old one, so the backup is the old inode itself: a
--     later rewrite of the working dir cannot change it (a hard-link snapshot can).
--   * --itemize-changes lists what the deploy CREATED (`>f+++++++++`, `cd+++++++++`, ...).
--   * A dry run first lists every path the deploy will touch; the state of those that exist
--     (type, mode, owner) is recorded before anything changes, because rsync changes some
--     things without a backup: a mode or owner change alone (`.f...p.....`), a directory's
--     mode, a directory deleted by --delete (only the files inside are backed up, an empty
--     directory leaves no trace at all).
--     Each file or symlink the deploy will replace or delete also gets its size and sha256 (or
--     its link target) recorded: a backup is only as good as it is complete, and rsync that
--     fails half way (a full disk: exit 11) leaves a truncated backup beside an untouched
--     original.
--   * Free space is checked before anything is touched: the backups on the state dir's file
--     system, the release on the working dir's, with a margin.
--   * The record (deploy.json in state_dir) is written before rsync runs (what the dry run
--     predicts, state "applying") and again after (what rsync reports, state "applied"), so
--     that a process killed in the middle can still be undone from the disk.
-- Undo removes what the deploy created, re-creates deleted directories, puts back each
-- replaced or deleted file whose pre-deploy bytes are gone from a backup verified against the
-- record (bytes, mode, owner, times, symlinks), never from one that does not match, puts
-- recorded modes and owners back, and checks the result before it says the deploy is undone.
-- Every other file is left alone: what the service wrote at run time (logs, caches, a SQLite
-- file) stays as it is.
--
-- Decisions (asserted in spec/deploy_spec.lua; docs/scripting.md, "rr.deploy", has the API):
--   * An rsync failure (exit code != 0, e.g. 23 "partial transfer") undoes the partial
--     deploy at once: apply returns nil, err, record and the working dir is as it was.
--   * A file the deploy replaced and the service then rewrote in place comes back as it was
--     before the deploy: undo restores what the deploy replaced. The record keeps each
--     touched file's size and mtime after the deploy, so undo names such files
--     (record.undo_report.changed_since_deploy) instead of discarding writes silently.
--   * rsync's quick check skips a file whose size and mtime match, even when its bytes
--     differ; pass checksum = true when the deploy path's mtimes are normalized (Nix,
--     reproducible archives).
local hostfs = require("rr.hostfs")
local state = require("rr.state")
local proc = require("rr.proc")
local remote = require("rr.remote")
local cjson = require("cjson")

-- The module is made once per host (make(fs), fs an rr.hostfs handle): deploy.on(handle) is the
-- same API acting on that host's files; deploy itself is this machine's.
local function make(fs)
-- The deploy source is always this machine's (rsync sends it to the host).
local lfs = hostfs.here()
local deploy = {}

local MANIFEST = "deploy.json"
-- 2: prior entries carry the size and sha256 (or link target) of what each backup stands for.
-- A version 1 record still loads; its backups are put back only when its rsync had succeeded.
local VERSION = 2

-- A private cjson instance: its options must not change other modules' encoding. (An empty
-- list is written as {}; it reads back as an empty table all the same.)
local json = cjson.new()

-- rsync's item flags are 11 characters wide, then one space, then the name.
local OUT_FORMAT = "--out-format=%i %n"

-- The itemized list is kept in memory (rr.proc captures 1 MiB unless told): room for
-- millions of paths.
local MAX_LISTING = 512 * 1024 * 1024

-- UTC, milliseconds: deploy.prune orders a service's records by created_at, and two deploys
-- may start within one second.
local function now_rfc3339()
  local ok, log = pcall(require, "rr.log")
  if ok and type(log) == "table" and log.timestamp then return log.timestamp() end
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

-- "/a/b/" -> "/a/b", keeping "/" itself.
local function strip_slash(path)
  local s = path:gsub("/+$", "")
  return s == "" and "/" or s
end

local function join(dir, rel)
  if rel == "." then return dir end
  return dir .. "/" .. rel
end

local function depth(rel)
  local _, n = rel:gsub("/", "")
  return n
end

-- Is `path` `dir` itself or inside it (both resolved, absolute)?
local function inside(path, dir)
  return path == dir or dir == "/" or path:sub(1, #dir + 1) == dir .. "/"
end

-- Permission bits of a stat mode (whatever type bits the C side includes).
local function perm(mode)
  return (mode or 0) & 4095
end

-- rsync escapes unprintable bytes in names as \#ooo (and a backslash before # as \#134).
local function unescape(name)
  return (name:gsub("\\#(%d%d%d)", function(octal) return string.char(tonumber(octal, 8)) end))
end

-- One line of --itemize-changes output -> item, or nil for anything else rsync prints.
-- item = { action = "deleted"|"created"|"changed"|"attrs", dir = bool, path = relative }
local function parse_item(line)
  if #line < 13 or line:sub(12, 12) ~= " " then return nil end
  local flags, name = line:sub(1, 11), line:sub(13)
  local dir = name:sub(-1) == "/"
  if dir then name = name:sub(1, -2) end
  if name == "" or name == "." then name = "." end
  if flags == "*deleting  " then
    return { action = "deleted", dir = dir, path = unescape(name) }
  end
  local update, kind, rest = flags:sub(1, 1), flags:sub(2, 2), flags:sub(3)
  if not update:match("[<>ch.]") or not kind:match("[fdLDS]") then return nil end
  local item = { dir = kind == "d", path = unescape(name) }
  if rest == "+++++++++" then
    item.action = "created"
  elseif update == "." or kind == "d" then
    item.action = "attrs"
  else
    item.action = "changed" -- new content or a new symlink target: the old one is backed up
  end
  return item
end

local function parse_items(text)
  local items = {}
  for line in (text or ""):gmatch("[^\n]+") do
    local item = parse_item(line)
    if item then items[#items + 1] = item end
  end
  return items
end

-- Sorted, deduplicated list of relative paths.
local function sorted_unique(list)
  local seen, out = {}, {}
  for _, p in ipairs(list) do
    if not seen[p] then
      seen[p] = true
      out[#out + 1] = p
    end
  end
  table.sort(out)
  return out
end

-- Deepest first (children before their parents), then by name for a stable order.
local function deepest_first(list)
  local out = { table.unpack(list) }
  table.sort(out, function(a, b)
    local da, db = depth(a), depth(b)
    if da ~= db then return da > db end
    return a > b
  end)
  return out
end

-- The record's lists from parsed items.
local function classify(items)
  local created, created_dirs, deleted, deleted_dirs, changed, attrs = {}, {}, {}, {}, {}, {}
  for _, item in ipairs(items) do
    local p = item.path
    if item.action == "created" then
      if item.dir then created_dirs[#created_dirs + 1] = p else created[#created + 1] = p end
    elseif item.action == "deleted" then
      if item.dir then deleted_dirs[#deleted_dirs + 1] = p else deleted[#deleted + 1] = p end
    elseif item.action == "changed" then
      changed[#changed + 1] = p
    else
      attrs[#attrs + 1] = p
    end
  end
  local backed_up = {}
  for _, p in ipairs(changed) do backed_up[#backed_up + 1] = p end
  for _, p in ipairs(deleted) do backed_up[#backed_up + 1] = p end
  return {
    created = sorted_unique(created),
    created_dirs = sorted_unique(created_dirs),
    replaced = sorted_unique(changed),
    deleted = sorted_unique(deleted),
    deleted_dirs = sorted_unique(deleted_dirs),
    attrs_changed = sorted_unique(attrs),
    backed_up = sorted_unique(backed_up),
  }
end

-- The state before the deploy of every listed path that exists: what undo puts back when
-- rsync leaves no backup of it (a mode, an owner, a directory). Each entry that is not a
-- directory and that the deploy replaces, deletes or turns into something else (rsync backs it
-- up) is marked `backup = true` with what undo verifies before and after putting it back: its
-- size and sha256 (a file) or its target (a symlink). nil, err when such a file cannot be read.
local function record_prior(target, items)
  local replaced = {}
  for _, item in ipairs(items) do
    if item.action ~= "attrs" then replaced[item.path] = true end
  end
  -- Batches: on a remote host one call stands for a command there, and a release has thousands
  -- of files.
  local rels, paths, seen = {}, {}, {}
  for _, item in ipairs(items) do
    if not seen[item.path] then
      seen[item.path] = true
      rels[#rels + 1] = item.path
      paths[#paths + 1] = join(target, item.path)
    end
  end
  local sts, serr = fs.stat_many(paths)
  if not sts then return nil, ("cannot read %s before the deploy: %s"):format(target, tostring(serr)) end
  local prior, files, links, entry_at = {}, {}, {}, {}
  for i, p in ipairs(rels) do
    local path = paths[i]
    local st = sts[path]
    if st then
      local e = { path = p, type = st.type, mode = perm(st.mode), uid = st.uid, gid = st.gid }
      if replaced[p] and st.type ~= "dir" then
        e.backup, e.size = true, st.size
        if st.type == "file" then files[#files + 1] = path
        elseif st.type == "link" then links[#links + 1] = path end
      end
      prior[#prior + 1] = e
      entry_at[path] = e
    end
  end
  local sums, codes = fs.sha256_many(files)
  local targets, lerr = fs.readlink_many(links)
  if not sums or not targets then
    return nil, ("cannot read the files of %s before the deploy (undo could not verify their backups): %s")
      :format(target, tostring(codes or lerr))
  end
  for _, path in ipairs(files) do
    if not sums[path] then
      return nil, ("cannot read %s before the deploy (undo could not verify its backup): %s"):format(path, codes[path])
    end
    entry_at[path].sha256 = sums[path]
  end
  for _, path in ipairs(links) do
    if not targets[path] then
      return nil, ("cannot read %s before the deploy (undo could not verify its backup): not a symbolic link any more")
        :format(path)
    end
    entry_at[path].link = targets[path]
  end
  table.sort(prior, function(a, b) return a.path < b.path end)
  return prior
end

---------------------------------------------------------------------------------------------
-- Free space, checked before anything is touched: rsync that fills a file system half way
-- leaves truncated backups and a half-deployed working dir.

-- Bytes kept free beyond what a deploy needs: SPACE_MARGIN plus SPACE_MARGIN_RATIO of it.
deploy.SPACE_MARGIN = 1024 * 1024
deploy.SPACE_MARGIN_RATIO = 0.01

-- "\040" in /proc/self/mountinfo is a space (and so on).
local function unoctal(s)
  return (s:gsub("\\(%d%d%d)", function(o) return string.char(tonumber(o, 8)) end))
end

-- The mount holding the existing path: { id =, point =, fstype = } (nil when unknown).
local function mount_of(path)
  local real = fs.realpath(path) or path
  local best
  for line in (fs.read("/proc/self/mountinfo") or ""):gmatch("[^\n]+") do
    local id, point, rest = line:match("^(%d+) %d+ %S+ %S+ (%S+) (.*)$")
    if id then
      point = unoctal(point)
      -- a later line for the same point is a mount on top of the earlier one
      if inside(real, point) and (not best or #point >= #best.point) then
        best = { id = id, point = point, fstype = rest:match(" %- (%S+)") or "?" }
      end
    end
  end
  return best
end

-- path made absolute (from the current directory).
local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return (fs.realpath(".") or ".") .. "/" .. path
end

-- path itself or its nearest existing parent (the state dir may not exist yet).
local function nearest_existing(path)
  local p = absolute(path)
  while not fs.stat(p, true) do
    local parent = p:match("^(.*)/[^/]*$")
    if parent == nil or parent == p then return "/" end
    p = parent == "" and "/" or parent
  end
  return p
end

-- size rounded up to whole blocks (a file takes at least one)
local function blocks(size, bsize)
  return math.max(1, (size + bsize - 1) // bsize) * bsize
end

local function human(bytes)
  if bytes >= 1024 * 1024 * 1024 then return ("%.1f GiB"):format(bytes / (1024 * 1024 * 1024)) end
  if bytes >= 1024 * 1024 then return ("%.1f MiB"):format(bytes / (1024 * 1024)) end
  return ("%.1f KiB"):format(bytes / 1024)
end

-- Checks that the backups fit on the state dir's file system and the release on the working
-- dir's, from the dry run's items and the prior entries. Backups into the same mount as the
-- working dir are renames and take no room; on the same file system through another mount they
-- are copies from the same free space. -> the checks made ({ {what, path, fs, needed, avail} })
-- | nil, err naming the file system, the bytes needed and available.
local function check_space(record, items)
  local target_at = record.target
  local state_at = nearest_existing(record.state_dir)
  local tsv, terr = fs.statvfs(target_at)
  local ssv, serr = fs.statvfs(state_at)
  if not tsv or not ssv then
    return nil, ("cannot read the free space before the deploy: %s"):format(tostring(terr or serr))
  end
  local release, backups = 0, 0
  for _, item in ipairs(items) do
    if item.action == "created" or item.action == "changed" then
      local st = lfs.stat(join(record.source, item.path))
      if st then release = release + blocks(st.type == "file" and st.size or 0, tsv.bsize) end
    end
  end
  for _, e in ipairs(record.prior) do
    if e.backup then backups = backups + blocks(e.size or 0, ssv.bsize) end
  end
  local tmount, smount = mount_of(target_at), mount_of(state_at)
  local same_fs = fs.stat(target_at, true).dev == fs.stat(state_at, true).dev
  local renames = same_fs and tmount and smount and tmount.id == smount.id
  local function describe(path, m) return m and ("%s (%s on %s)"):format(path, m.fstype, m.point) or path end
  local checks = {}
  if same_fs then
    checks[1] = { what = renames and "the release" or "the release and the backups",
      path = describe(record.target, tmount), needed = release + (renames and 0 or backups), avail = tsv.avail }
  else
    checks[1] = { what = "the release (new and replacing files)", path = describe(record.target, tmount),
      needed = release, avail = tsv.avail }
    checks[2] = { what = "the backups of the files it replaces or deletes",
      path = describe(record.state_dir, smount), needed = backups, avail = ssv.avail }
  end
  for _, c in ipairs(checks) do
    local margin = deploy.SPACE_MARGIN + math.ceil(c.needed * deploy.SPACE_MARGIN_RATIO)
    c.margin = margin
    if c.needed + margin > c.avail then
      return nil, ("not enough free space for the deploy on the file system of %s: %s need %d bytes (%s, "
        .. "with a margin of %s), %d bytes (%s) are available; nothing was changed")
        :format(c.path, c.what, c.needed + margin, human(c.needed + margin), human(margin), c.avail, human(c.avail))
    end
  end
  return checks
end

-- A regular file's size and mtime as one string: JSON would round a float mtime.
local function fingerprint(st)
  return ("%d %.6f"):format(st.size or 0, st.mtime or 0)
end

-- The fingerprint after the deploy of every regular file it wrote: undo compares them to
-- name the files the service changed since.
local function fingerprints(target, paths)
  local after, full = {}, {}
  for i, p in ipairs(paths) do full[i] = join(target, p) end
  local sts = fs.stat_many(full) or {}
  for i, p in ipairs(paths) do
    local st = sts[full[i]]
    if st and st.type == "file" then
      after[#after + 1] = { path = p, fingerprint = fingerprint(st) }
    end
  end
  return after
end

local function save(record)
  local data = json.encode(record)
  local ok, err = fs.write_atomic(record.state_dir .. "/" .. MANIFEST, data .. "\n",
    { mode = 384, under = record.state_root })
  if not ok then
    return nil, ("cannot write the deploy record in %s: %s"):format(record.state_dir, tostring(err))
  end
  return true
end

local function by_path(list)
  local map = {}
  for _, e in ipairs(list or {}) do map[e.path] = e end
  return map
end

-- rsync's stderr, trimmed to its last lines, for an error message.
local function stderr_tail(res)
  local text = type(res) == "table" and res.stderr or nil
  if not text or text == "" then return "" end
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  local first = math.max(1, #lines - 4)
  return ": " .. table.concat(lines, " | ", first)
end

local function check_apply_opts(opts)
  if type(opts) ~= "table" then
    error("rr.deploy.apply: expects a table { source =, target =, state_dir = }", 3)
  end
  for _, key in ipairs({ "source", "target", "state_dir" }) do
    if type(opts[key]) ~= "string" or opts[key] == "" then
      error(("rr.deploy.apply: %s must be a path (string), got %s"):format(key, type(opts[key])), 3)
    end
  end
  if opts.on_line ~= nil and type(opts.on_line) ~= "function" then
    error("rr.deploy.apply: on_line must be a function", 3)
  end
  if opts.timeout ~= nil and type(opts.timeout) ~= "number" then
    error("rr.deploy.apply: timeout must be a number of seconds", 3)
  end
  if opts.state_root ~= nil then
    if type(opts.state_root) ~= "string" or opts.state_root == "" then
      error("rr.deploy.apply: state_root must be a path (string)", 3)
    end
    if not inside(strip_slash(opts.state_dir), strip_slash(opts.state_root)) then
      error(("rr.deploy.apply: state_dir %s is not under state_root %s"):format(opts.state_dir, opts.state_root), 3)
    end
  end
end

-- Resolves a directory argument: its real path, or nil, err when it is not a directory.
local function existing_dir(path, what, dfs)
  local fs = dfs or fs
  local st, err = fs.stat(path)
  if not st then
    return nil, ("%s %s does not exist: %s"):format(what, path, tostring(err))
  end
  local real, rerr = fs.realpath(path)
  if not real then
    return nil, ("%s %s: %s"):format(what, path, tostring(rerr))
  end
  st = fs.stat(real)
  if not st or st.type ~= "dir" then
    return nil, ("%s %s is not a directory"):format(what, path)
  end
  return real
end

local function rsync_argv(record, extra, with_backup)
  local argv = { "rsync", "-a", "-8", "--itemize-changes", OUT_FORMAT }
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  if record.delete then argv[#argv + 1] = "--delete" end
  if record.checksum then argv[#argv + 1] = "--checksum" end
  if with_backup then
    argv[#argv + 1] = "--backup"
    argv[#argv + 1] = "--backup-dir=" .. record.backup_dir
  end
  if fs.remote then
    -- from this machine to the host, through its ssh connection: the receiving rsync there
    -- makes the backups (--backup-dir is a path on the host)
    local options = { table.unpack(argv, 2) }
    return remote.rsync_argv(fs.host, options, record.source .. "/", record.target .. "/",
      { ssh_config = fs.ssh_config })
  end
  argv[#argv + 1] = "--"
  argv[#argv + 1] = record.source .. "/"
  argv[#argv + 1] = record.target .. "/"
  return argv
end

-- Runs rsync -> proc.run's returns. With a manager, as a transient unit of it (rr.systemd's
-- m:run): a timeout then ends every process rsync started, wherever it went. on_spawn(pid, what)
-- hears the (main) PID while it runs (the run journal keeps it: a later run must know that an
-- rsync of a dead run may still be writing) and may return a function called once it has ended.
local function run_tracked(argv, opts, on_spawn, manager)
  if manager then
    local o, ended = { name_prefix = "rrengine-rsync" }, nil
    for k, v in pairs(opts) do o[k] = v end
    if on_spawn then
      o.on_start = function(unit, pid)
        if pid then ended = on_spawn(pid, table.concat(argv, " ") .. ", as unit " .. unit) end
      end
    end
    local res, err, code, r = manager:run(argv, o)
    if ended then ended() end
    return res, err, code, r
  end
  if not on_spawn then return proc.run(argv, opts) end
  local p, err, code = proc.spawn(argv, opts)
  if not p then return nil, err, code end
  local process <close> = p
  local ended = on_spawn(p:pid(), table.concat(argv, " "))
  local res, werr, wcode, r = p:wait()
  if ended then ended() end
  return res, werr, wcode, r
end

-- The real path a directory will have once created: its nearest existing parent resolved.
local function future_real(path)
  path = absolute(path)
  local base = nearest_existing(path)
  local real = fs.realpath(base) or base
  local rest = path:sub(#base + 1)
  if real == "/" then return "/" .. rest:gsub("^/+", "") end
  return real .. rest
end

-- The state root a record dir lies under when the caller does not say: <root>/runs/<run>/<svc>
-- is rr.state's layout.
local function implied_root(state_dir)
  return state_dir:match("^(.+)/runs/[^/]+/[^/]+$")
end

-- One sentence on what an undo found that an operator must know (backups not used, files it
-- could not verify), or "".
local function undo_notes(report)
  local notes = {}
  for _, b in ipairs(report and report.bad_backups or {}) do
    notes[#notes + 1] = ("the backup of %s is %s and was not used (%s)"):format(b.path, b.reason, b.outcome)
  end
  for _, p in ipairs(report and report.unverified or {}) do
    notes[#notes + 1] = ("%s was put back from a backup the record has no hash of"):format(p)
  end
  if #notes == 0 then return "" end
  return "; " .. table.concat(notes, "; ")
end

-- deploy.apply{ source = DIR, target = DIR, state_dir = DIR, state_root = DIR, delete = false,
--               checksum = false, on_line = fn(stream, line), on_spawn = fn(pid, what),
--               timeout = seconds }
-- -> record | nil, err[, record]. On an rsync failure the partial deploy is undone before
-- apply returns (the error says whether that worked; the record is the third value).
function deploy.apply(opts)
  check_apply_opts(opts)
  local source, err = existing_dir(opts.source, "deploy source", lfs)
  if not source then return nil, err end
  local target
  target, err = existing_dir(opts.target, "working dir")
  if not target then return nil, err end
  if not fs.remote and (inside(source, target) or inside(target, source)) then
    return nil, ("deploy source %s and working dir %s overlap"):format(source, target)
  end

  -- Absolute: rsync reads a relative --backup-dir from the working dir, not from here.
  local state_dir = strip_slash(absolute(opts.state_dir))
  local state_root = opts.state_root and strip_slash(absolute(opts.state_root)) or implied_root(state_dir)
  local real_state = future_real(state_dir)
  if inside(real_state, target) or (not fs.remote and inside(real_state, source)) then
    return nil, ("the deploy state dir %s is inside %s: rsync would copy or delete it")
      :format(state_dir, inside(real_state, target) and target or source)
  end
  if fs.exists(state_dir .. "/" .. MANIFEST) or fs.exists(state_dir .. "/backup") then
    return nil, ("%s already holds a deploy record: one state dir per deploy"):format(state_dir)
  end

  local record = {
    version = VERSION,
    source = source,
    target = target,
    state_dir = state_dir,
    state_root = state_root,
    backup_dir = state_dir .. "/backup",
    delete = opts.delete == true,
    checksum = opts.checksum == true,
    host = fs.host,
    created_at = now_rfc3339(),
    state = "applying",
  }

  -- 1. What will change, and the state now of everything that will: types, modes, owners, and
  -- the size and hash of every file a backup will stand for.
  local plan, perr, _, pres = proc.run(rsync_argv(record, { "--dry-run" }, false),
    { capture = true, max_capture = MAX_LISTING, timeout = opts.timeout })
  if not plan then
    return nil, ("rsync dry run failed: %s%s"):format(tostring(perr), stderr_tail(pres))
  end
  if plan.truncated and plan.truncated.stdout then
    return nil, "rsync dry run listed more than the deploy can record"
  end
  local planned_items = parse_items(plan.stdout)
  local planned = classify(planned_items)
  record.prior, err = record_prior(target, planned_items)
  if not record.prior then return nil, err end
  record.created, record.created_dirs = planned.created, planned.created_dirs
  record.replaced, record.deleted, record.deleted_dirs = planned.replaced, planned.deleted, planned.deleted_dirs
  record.attrs_changed, record.backed_up = planned.attrs_changed, planned.backed_up
  record.after = {}

  -- 2. Room for it all, before anything is written.
  local space
  space, err = check_space(record, planned_items)
  if not space then return nil, err end
  record.space = space

  -- 3. The record, before rsync runs. No directory below the state root is followed through a
  -- symlink (a runs/ linked to elsewhere is refused, nothing written).
  local ok, merr = fs.mkdir_p(state_dir, 448, state_root and { under = state_root } or nil)
  if not ok then
    return nil, ("cannot create the deploy state dir %s: %s"):format(state_dir, tostring(merr))
  end
  ok, err = save(record)
  if not ok then return nil, err end

  -- 4. The deploy itself.
  local res, rerr, _, rres = run_tracked(rsync_argv(record, {}, true), {
    capture = true,
    max_capture = MAX_LISTING,
    timeout = opts.timeout,
    on_line = opts.on_line,
  }, opts.on_spawn, not fs.remote and opts.manager or nil)
  local out = res or (type(rres) == "table" and rres) or nil
  if res then
    -- What rsync reports it did replaces the prediction.
    for key, list in pairs(classify(parse_items(res.stdout))) do record[key] = list end
  elseif out then
    -- A failed or killed rsync may not have printed every item it handled: keep the
    -- prediction too. Undo copes with predicted items rsync never reached (it removes only
    -- what is there and was not there before, and leaves a file that still holds its
    -- pre-deploy bytes).
    local done = classify(parse_items(out.stdout))
    for key, list in pairs(done) do
      local merged = { table.unpack(record[key]) }
      for _, p in ipairs(list) do merged[#merged + 1] = p end
      record[key] = sorted_unique(merged)
    end
  end

  if not res then
    record.state = "failed"
    record.error = ("rsync failed: %s%s"):format(tostring(rerr), stderr_tail(rres))
    local _, serr = save(record)
    if not out then
      -- rsync did not run at all (not installed): nothing changed.
      record.state = "undone"
      save(record)
      return nil, record.error, record
    end
    local undone, uerr = deploy.undo(record, { force = true })
    -- A full state file system may refuse the record's update: the undo is done all the same,
    -- and the record on disk ("applying") still undoes it again (idempotent) if asked.
    local function unsaved(e) return e and (" (" .. e .. ")") or "" end
    if undone then
      return nil, record.error .. " (the partial deploy was undone and every file it touched checked against "
        .. "its pre-deploy size and sha256: the working dir is as it was" .. undo_notes(record.undo_report) .. ")"
        .. unsaved(record.save_error), record
    end
    return nil, record.error .. "; undoing the partial deploy failed too: " .. tostring(uerr) .. unsaved(serr), record
  end

  local written = { table.unpack(record.created) }
  for _, p in ipairs(record.replaced) do written[#written + 1] = p end
  record.after = fingerprints(target, written)
  record.state = "applied"
  record.applied_at = now_rfc3339()
  ok, err = save(record)
  if not ok then
    -- Without a record on disk a crash could not be undone: refuse to go on with this deploy.
    local undone, uerr = deploy.undo(record, { force = true })
    return nil, err .. (undone and " (the deploy was undone)" or ("; undo failed too: " .. tostring(uerr))),
      record
  end
  return record
end

-- deploy.load(state_dir) -> record | nil, err: the record apply wrote there.
function deploy.load(state_dir)
  if type(state_dir) ~= "string" then
    error("rr.deploy.load: state_dir must be a path (string)", 2)
  end
  -- A path read from a pointer file may end in a newline.
  local path = strip_slash(state_dir:match("^%s*(.-)%s*$")) .. "/" .. MANIFEST
  local data, err = fs.read(path)
  if not data then
    return nil, ("no deploy record in %s: %s"):format(state_dir, tostring(err))
  end
  local ok, record = pcall(json.decode, data)
  if not ok or type(record) ~= "table" then
    return nil, ("the deploy record %s is not valid JSON"):format(path)
  end
  if (record.version ~= VERSION and record.version ~= 1) or type(record.target) ~= "string"
      or type(record.backup_dir) ~= "string" then
    return nil, ("the deploy record %s has an unknown shape (version %s)"):format(path, tostring(record.version))
  end
  for _, key in ipairs({ "created", "created_dirs", "replaced", "deleted", "deleted_dirs",
                         "attrs_changed", "backed_up", "prior", "after" }) do
    if type(record[key]) ~= "table" then record[key] = {} end
  end
  -- cjson reads every number as a float; sizes, modes and ids are integers.
  for _, e in ipairs(record.prior) do
    e.mode, e.uid, e.gid = math.tointeger(e.mode), math.tointeger(e.uid), math.tointeger(e.gid)
    e.size = math.tointeger(e.size)
  end
  record.version = math.tointeger(record.version)
  return record
end

-- Runs a small command (chmod, chown, rsync) for undo; nil, err when it fails.
local function run(argv)
  local res, err, _, r = fs.run(argv, { capture = true })
  if not res then
    return nil, tostring(err) .. stderr_tail(r)
  end
  return res
end

-- Mode and owner of `path` back to what `want` recorded.
local function put_back_attrs(path, want, st)
  if want.uid and want.gid and (st.uid ~= want.uid or st.gid ~= want.gid) then
    local ok, err = run({ "chown", "-h", ("%d:%d"):format(want.uid, want.gid), "--", path })
    if not ok then return nil, err end
  end
  if st.type ~= "link" and want.mode and perm(st.mode) ~= want.mode then
    local ok, err = run({ "chmod", ("%04o"):format(want.mode), "--", path })
    if not ok then return nil, err end
  end
  return true
end

-- rsync's temp files (".<name>.XXXXXX") left beside the files it was writing when it was
-- killed: only a crashed apply has them.
local function remove_rsync_temps(target, paths)
  local by_dir = {}
  for _, rel in ipairs(paths) do
    local dir, base = rel:match("^(.*)/([^/]+)$")
    if not dir then dir, base = ".", rel end
    by_dir[dir] = by_dir[dir] or {}
    by_dir[dir][base] = true
  end
  for dir, bases in pairs(by_dir) do
    for _, name in ipairs(fs.list(join(target, dir)) or {}) do
      local base = name:match("^%.(.+)%.[%w_]+$")
      if base and bases[base] and #name == #base + 8 then
        fs.remove(join(join(target, dir), name))
      end
    end
  end
end

-- Does each { entry =, path = } hold what the prior entry recorded before the deploy (type, and
-- size + sha256 or link target)? All at once, in a few batch calls (on a remote host each call
-- is a command there): -> { [i] = { true } | { false, how it differs } }, the stats by path.
local function holds_many(list)
  local paths = {}
  for i, x in ipairs(list) do paths[i] = x.path end
  local sts = fs.stat_many(paths) or {}
  local files, links = {}, {}
  for _, x in ipairs(list) do
    local st = sts[x.path]
    if st and st.type == x.entry.type then
      if st.type == "file" and st.size == x.entry.size then files[#files + 1] = x.path
      elseif st.type == "link" then links[#links + 1] = x.path end
    end
  end
  local sums, codes = fs.sha256_many(files)
  if not sums then sums, codes = {}, {} end
  local targets = fs.readlink_many(links) or {}
  local out = {}
  for i, x in ipairs(list) do
    local e, st = x.entry, sts[x.path]
    local r = { true }
    if not st then r = { false, "missing" }
    elseif st.type ~= e.type then r = { false, ("a %s, not a %s"):format(st.type, e.type) }
    elseif e.type == "file" then
      if st.size ~= e.size then r = { false, ("%d of %d bytes"):format(st.size, e.size) }
      elseif not sums[x.path] then r = { false, ("unreadable: %s"):format(tostring(codes[x.path] or "EIO")) }
      elseif sums[x.path] ~= e.sha256 then r = { false, "other bytes of the same size (sha256 differs)" } end
    elseif e.type == "link" and (targets[x.path] or nil) ~= e.link then
      r = { false, ("a link to %s, not to %s"):format(tostring(targets[x.path] or nil), tostring(e.link)) }
    end
    out[i] = r
  end
  return out, sts
end

-- { [rel] = st } of base/rel for each rel, in one batch call (missing ones absent).
local function stats_of(base, rels)
  local paths = {}
  for i, rel in ipairs(rels) do paths[i] = join(base, rel) end
  local sts = fs.stat_many(paths) or {}
  local out = {}
  for i, rel in ipairs(rels) do out[rel] = sts[paths[i]] or nil end
  return out
end

-- Puts the backup `from` (a file, a symlink or a special file) in place of path, atomically
-- for files and links (bytes, mode, owner and times come with it). st: from's stat when known;
-- dirs: { [dir] = true } of directories known to exist (filled in as it goes).
local function put_back(from, path, st, dirs)
  st = st or fs.stat(from)
  local parent, base = path:match("^(.*)/([^/]+)$")
  if not (dirs and dirs[parent]) and not fs.stat(parent) then
    local ok, err = fs.mkdir_p(parent, 493)
    if not ok then return nil, err end
  end
  if dirs then dirs[parent] = true end
  if st and st.type == "file" then
    return fs.copy_atomic(from, path)
  elseif st and st.type == "link" then
    local to, err = fs.readlink(from)
    if not to then return nil, err end
    local tmp = parent .. "/.rr-undo." .. base
    fs.remove(tmp)
    local ok, lerr = fs.symlink(to, tmp)
    if not ok then return nil, lerr end
    ok, lerr = fs.rename(tmp, path)
    if not ok then fs.remove(tmp) end
    return ok, lerr
  end
  return run({ "rsync", "-a", "--", from, path })
end

-- deploy.undo(record[, { force = bool }]) -> true | nil, err. Idempotent: a record already
-- undone is left alone unless force is set, and undoing twice changes nothing the second time.
-- What it did is in record.undo_report { removed, restored, intact, recreated, kept,
-- changed_since_deploy, bad_backups, not_restorable, unverified }.
--
-- Only what can be verified is put back: each file the deploy replaced or deleted has its size
-- and sha256 in the record (taken before rsync ran). A file that still holds them is left as it
-- is (rsync never reached it, or failed before replacing it); otherwise its backup is put back
-- only when the backup holds them too. A backup that does not (truncated by a full disk, or
-- missing) is never copied over the working dir: the file is reported as not restorable and
-- undo fails. Once done, every such file is checked again before the deploy counts as undone.
function deploy.undo(record, opts)
  if type(record) ~= "table" or type(record.target) ~= "string" or type(record.backup_dir) ~= "string" then
    error("rr.deploy.undo: expects a record from deploy.apply or deploy.load", 2)
  end
  opts = opts or {}
  if record.state == "undone" and not opts.force then
    return true
  end
  local target = record.target
  local st = fs.stat(target)
  if not st or st.type ~= "dir" then
    return nil, ("working dir %s is gone: nothing to undo into"):format(target)
  end

  local report = { removed = {}, restored = {}, intact = {}, recreated = {}, kept = {}, changed_since_deploy = {},
                   bad_backups = {}, not_restorable = {}, unverified = {} }
  local problems = {}
  local function problem(msg) problems[#problems + 1] = msg end
  local after = by_path(record.after)

  -- Has the file at rel changed since the deploy wrote it? (size or mtime differ)
  local function changed_since(rel, cur)
    local a = after[rel]
    return a and cur and cur.type == "file" and fingerprint(cur) ~= a.fingerprint
  end

  if record.state == "applying" or record.state == "failed" then
    local writing = { table.unpack(record.created) }
    for _, p in ipairs(record.replaced or {}) do writing[#writing + 1] = p end
    remove_rsync_temps(target, writing)
  end

  -- 1. Files, symlinks, FIFOs the deploy created: removed, whatever happened to them since.
  -- A path that held something else before (a symlink the deploy turned into a file) and
  -- still holds the same type was not reached by a killed deploy: it is the original.
  local prior_of = by_path(record.prior)
  local created = deepest_first(record.created or {})
  local created_st = stats_of(target, created)
  local removing, removing_rel = {}, {}
  for _, rel in ipairs(created) do
    local path = join(target, rel)
    local cur = created_st[rel]
    local before = prior_of[rel]
    if cur and before and before.type == cur.type then
      cur = nil -- the original, left alone
    end
    if cur and cur.type ~= "dir" then
      if changed_since(rel, cur) then
        report.changed_since_deploy[#report.changed_since_deploy + 1] = rel
      end
      removing[#removing + 1], removing_rel[path] = path, rel
    elseif cur then
      problem(("%s was created as a file by the deploy and is a directory now: left alone"):format(path))
    end
  end
  -- one batch: on a remote host, one command for them all
  local removed, rerrs = fs.remove_many(removing)
  for _, path in ipairs(removing) do
    if removed and removed[path] then
      report.removed[#report.removed + 1] = removing_rel[path]
    else
      problem(("cannot remove %s: %s"):format(path, removed and rerrs[path].message or tostring(rerrs)))
    end
  end

  -- 2. Directories the deploy created: removed when empty (the service may have written into one).
  -- Deepest first, in one batch: a directory is removed only when empty (rmdir), so one the
  -- service wrote into fails with ENOTEMPTY and stays.
  local created_dirs = deepest_first(record.created_dirs or {})
  local dirs_st = stats_of(target, created_dirs)
  local rmdirs, rmdir_rel = {}, {}
  for _, rel in ipairs(created_dirs) do
    local cur = dirs_st[rel]
    if rel ~= "." and cur and cur.type == "dir" then
      local path = join(target, rel)
      rmdirs[#rmdirs + 1], rmdir_rel[path] = path, rel
    end
  end
  local rmdired, derrs = fs.remove_many(rmdirs)
  for _, path in ipairs(rmdirs) do
    local rel = rmdir_rel[path]
    if rmdired and rmdired[path] then
      report.removed[#report.removed + 1] = rel .. "/"
    elseif rmdired and (derrs[path].code == "ENOTEMPTY" or derrs[path].code == "EEXIST") then
      report.kept[#report.kept + 1] = rel .. "/"
    else
      problem(("cannot remove the directory %s: %s"):format(path, rmdired and derrs[path].message or tostring(derrs)))
    end
  end

  -- 3. Directories that existed before (deleted by --delete, or replaced by a file; an empty
  -- one has no backup), shallowest first, so that the files below can come back.
  local prior = { table.unpack(record.prior or {}) }
  table.sort(prior, function(a, b)
    local da, db = depth(a.path), depth(b.path)
    if da ~= db then return da < db end
    return a.path < b.path
  end)
  local prior_dirs = {}
  for _, want in ipairs(prior) do
    if want.type == "dir" then prior_dirs[#prior_dirs + 1] = want.path end
  end
  local prior_dirs_st = stats_of(target, prior_dirs)
  for _, want in ipairs(prior) do
    local path = join(target, want.path)
    if want.type == "dir" and not prior_dirs_st[want.path] then
      local ok, err = fs.mkdir_p(path, want.mode or 493)
      if ok then
        report.recreated[#report.recreated + 1] = want.path .. "/"
      else
        problem(("cannot re-create the directory %s: %s"):format(path, tostring(err)))
      end
    end
  end

  -- 4. What the deploy replaced or deleted, each file verified before and after (in batches:
  -- the checks of every file at once, then one copy a file put back).
  local replaced_st = stats_of(target, record.replaced or {})
  for _, rel in ipairs(record.replaced or {}) do
    if changed_since(rel, replaced_st[rel]) then
      report.changed_since_deploy[#report.changed_since_deploy + 1] = rel
    end
  end
  local lost = {}
  local checked = {}
  local wants, probes = {}, {}
  for _, want in ipairs(prior) do
    if want.backup and (want.sha256 or want.link or (want.type ~= "file" and want.type ~= "link")) then
      wants[#wants + 1] = want
      probes[#probes + 1] = { entry = want, path = join(target, want.path) }
      probes[#probes + 1] = { entry = want, path = join(record.backup_dir, want.path) }
    end
  end
  local held, probed = holds_many(probes)
  local parents, seen_parent = {}, {}
  for _, want in ipairs(wants) do
    local parent = join(target, want.path):match("^(.*)/[^/]+$")
    if not seen_parent[parent] then seen_parent[parent] = true; parents[#parents + 1] = parent end
  end
  local dirs, copies, copy_of = {}, {}, {}
  for p, st in pairs(fs.stat_many(parents) or {}) do
    if st and st.type == "dir" then dirs[p] = true end
  end
  for i, want in ipairs(wants) do
    checked[want.path] = want
    local path, backup = join(target, want.path), join(record.backup_dir, want.path)
    local here, why_here = held[2 * i - 1][1], held[2 * i - 1][2]
    local good, why_backup = held[2 * i][1], held[2 * i][2]
    local backup_st = probed[backup] or nil
    if backup_st and not good then
      report.bad_backups[#report.bad_backups + 1] = { path = want.path, reason = why_backup,
        outcome = here and "the working dir still holds the original" or "the working dir's copy is not the original" }
    end
    if here then
      report.intact[#report.intact + 1] = want.path
    elseif not good then
      lost[want.path] = true
      report.not_restorable[#report.not_restorable + 1] = { path = want.path, reason = why_here }
      problem(("%s cannot be restored: it is %s, and its backup %s is %s; it was not touched, put its pre-deploy "
        .. "version back by hand (sha256 %s)"):format(path, why_here, backup,
        backup_st and why_backup or "missing", tostring(want.sha256 or want.link or want.type)))
    elseif (probed[path] or {}).type == "dir" then
      lost[want.path] = true
      report.not_restorable[#report.not_restorable + 1] = { path = want.path, reason = "a directory now" }
      problem(("%s was a %s before the deploy and is a directory now: left alone"):format(path, want.type))
    elseif backup_st and backup_st.type == "file" then
      -- files come back in one batch below; their directory first
      local parent = path:match("^(.*)/[^/]+$")
      local ok, err = true, nil
      if not dirs[parent] then ok, err = fs.mkdir_p(parent, 493) end
      if ok then
        dirs[parent] = true
        copies[#copies + 1], copy_of[path] = { backup, path }, want.path
      else
        problem(("cannot put back %s from %s: %s"):format(path, backup, tostring(err)))
      end
    else
      local ok, err = put_back(backup, path, backup_st, dirs)
      if ok then
        report.restored[#report.restored + 1] = want.path
      else
        problem(("cannot put back %s from %s: %s"):format(path, backup, tostring(err)))
      end
    end
  end
  -- The files in one rsync on their host, from the backup dir, their relative paths on its
  -- stdin: each written to a temporary name, synced, renamed over the file, with its bytes,
  -- mode, owner and times (-I: whatever its size and time say). Whether each came back is then
  -- checked against the record, all at once.
  if #copies > 0 then
    local rels = {}
    for i, pr in ipairs(copies) do rels[i] = copy_of[pr[2]] end
    local argv = { "rsync", "-a", "-I", "--fsync", "--no-implied-dirs", "--from0", "--files-from=-", "--",
      record.backup_dir .. "/", target .. "/" }
    local input = table.concat(rels, "\0") .. "\0"
    local res, rerr, _, r = fs.run(argv, { stdin = input, capture = true })
    if not res and r and r.exit_code == 1 and (r.stderr or ""):find("fsync", 1, true) then
      -- an rsync older than 3.2.4 has no --fsync: the copies are still atomic
      table.remove(argv, 4)
      res, rerr, _, r = fs.run(argv, { stdin = input, capture = true })
    end
    local why = not res and (tostring(rerr) .. stderr_tail(r)) or nil
    local probes_back = {}
    for i, pr in ipairs(copies) do probes_back[i] = { entry = checked[copy_of[pr[2]]], path = pr[2] } end
    for i, back in ipairs((holds_many(probes_back))) do
      local pr = copies[i]
      if back[1] then
        report.restored[#report.restored + 1] = copy_of[pr[2]]
      else
        problem(("cannot put back %s from %s: %s"):format(pr[2], pr[1], why or ("it is " .. tostring(back[2]))))
      end
    end
  end
  -- Backups the record holds no hash of: a version 1 record, or a file rsync replaced that its
  -- dry run did not list (the deploy path changed meanwhile). Trusted only when rsync finished
  -- (exit code 0: every backup it made is whole).
  for _, rel in ipairs(record.backed_up or {}) do
    local backup = join(record.backup_dir, rel)
    if not checked[rel] and fs.stat(backup) then
      local path = join(target, rel)
      if not record.applied_at then
        lost[rel] = true
        report.not_restorable[#report.not_restorable + 1] = { path = rel, reason = "no hash to verify its backup" }
        problem(("%s cannot be restored: rsync failed, and the record has no hash to verify its backup %s "
          .. "against; it was not touched, check it by hand"):format(path, backup))
      else
        local ok, err = put_back(backup, path)
        if ok then
          report.restored[#report.restored + 1] = rel
          report.unverified[#report.unverified + 1] = rel
        else
          problem(("cannot put back %s from %s: %s"):format(path, backup, tostring(err)))
        end
      end
    end
  end

  -- 5. Modes and owners as the record saw them before the deploy (rsync changes a mode or an
  -- owner alone without a backup).
  local prior_rels = {}
  for i, want in ipairs(prior) do prior_rels[i] = want.path end
  local prior_st = stats_of(target, prior_rels)
  for _, want in ipairs(prior) do
    local path = join(target, want.path)
    local cur = prior_st[want.path]
    if cur and cur.type == want.type then
      local ok, err = put_back_attrs(path, want, cur)
      if not ok then
        problem(("cannot put back the mode or owner of %s: %s"):format(path, tostring(err)))
      end
    elseif cur and not lost[want.path] then
      problem(("%s was a %s before the deploy and is a %s now: left alone"):format(path, want.type, cur.type))
    end
  end

  -- 6. The result, checked before the deploy counts as undone: every verified file holds its
  -- pre-deploy size and hash.
  local final = {}
  for _, want in ipairs(wants) do
    if not lost[want.path] then final[#final + 1] = { entry = want, path = join(target, want.path) } end
  end
  for i, r in ipairs((holds_many(final))) do
    if not r[1] then
      problem(("after the undo %s is %s, not what it was before the deploy"):format(final[i].path, r[2]))
    end
  end

  table.sort(report.restored)
  record.undo_report = report
  if #problems > 0 then
    return nil, ("undo of the deploy into %s is incomplete: %s"):format(target, table.concat(problems, "; "))
  end
  record.state = "undone"
  record.undone_at = now_rfc3339()
  record.save_error = nil
  if fs.stat(record.state_dir or "") then
    -- The undo is complete either way; the record on disk only tells a later process so.
    local _, err = save(record)
    record.save_error = err
  end
  return true
end

---------------------------------------------------------------------------------------------
-- Pruning. A deploy's state dir is <state_root>/runs/<run-id>/<service>/ (the record
-- deploy.json and backup/); the pointers that name the unfinished and the last deploy are
-- rr.state's (deploy_begin / deploy_commit / deploy_undone).

deploy.KEEP = 5

-- created_at as a sortable key (a second-resolution time sorts as its .000).
local function time_key(record)
  local t = type(record.created_at) == "string" and record.created_at or ""
  local base, rest = t:match("^(%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d)(.*)$")
  if not base then return "" end
  local frac = rest:match("^%.(%d+)") or ""
  return base .. "." .. (frac .. "000"):sub(1, 3)
end

-- deploy.prune(state_root, service[, { keep = 5, protect = { dir, ... } }])
-- -> { removed = {dirs}, kept = {dirs}, reasons = { [dir] = why } } | nil, err, partial (a dir
-- that could not be removed: err names it, partial is the result so far)
-- Removes the service's oldest deploy records (runs/<run-id>/<service>/, ordered by the
-- record's created_at) beyond the newest `keep`, and then each runs/<run-id>/ left empty.
-- Never removed, whatever their age:
--   * a dir named in `protect`, or by the service's .inflight or .last pointer ("protected");
--   * a record whose state is "applying" or "failed": a deploy that did not finish, or whose
--     partial undo failed — an operator may still need it ("unfinished");
--   * a dir whose record cannot be read ("unreadable: <why>").
-- A dir with no record and no backup (apply stopped before it wrote one: nothing changed) is
-- removed. Each dir is first renamed to runs/<run-id>/.<service>.pruning (one atomic step: a
-- crash never leaves half a record under a record's name); the next prune clears leftovers.
-- Call it under the run lock.
function deploy.prune(state_root, service, opts)
  if type(state_root) ~= "string" or state_root == "" then
    error("rr.deploy.prune: state_root must be a directory path", 2)
  end
  if type(service) ~= "string" or not service:match("^[%w][%w%._:@%-]*$") then
    error(("rr.deploy.prune: invalid service name %s"):format(tostring(service)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("rr.deploy.prune: opts must be a table { keep =, protect = }", 2)
  end
  opts = opts or {}
  local keep = opts.keep == nil and deploy.KEEP or math.tointeger(opts.keep)
  if not keep or keep < 0 then
    error("rr.deploy.prune: keep must be an integer >= 0", 2)
  end
  if opts.protect ~= nil and type(opts.protect) ~= "table" then
    error("rr.deploy.prune: protect must be a list of directories", 2)
  end

  local protected = {}
  for i, dir in ipairs(opts.protect or {}) do
    if type(dir) ~= "string" or dir == "" then
      error(("rr.deploy.prune: protect[%d] must be a path (string)"):format(i), 2)
    end
    protected[state.canonical(dir, fs)] = true
  end
  for _, kind in ipairs({ "inflight", "last" }) do
    local dir = state.read_pointer(state_root, service, kind, fs)
    if dir then protected[state.canonical(dir, fs)] = true end
  end

  local runs = strip_slash(state_root) .. "/runs"
  local result = { removed = {}, kept = {}, reasons = {} }
  local problems = {}
  local touched_runs = {}
  local records = {}
  local leftover = "." .. service .. ".pruning"

  local function remove_dir(run_dir, dir)
    local ok, err = state.discard(dir, run_dir .. "/" .. leftover, state_root, fs)
    if not ok then
      problems[#problems + 1] = err
      return
    end
    result.removed[#result.removed + 1] = dir
    touched_runs[run_dir] = true
  end

  local function keep_dir(dir, why)
    result.kept[#result.kept + 1] = dir
    result.reasons[dir] = why
  end

  local names = fs.list(runs) or {}
  table.sort(names)
  for _, run in ipairs(names) do
    local run_dir = runs .. "/" .. run
    if fs.stat(run_dir .. "/" .. leftover) then
      fs.remove_tree(run_dir .. "/" .. leftover, state.under(state_root))
      touched_runs[run_dir] = true
    end
    local dir = run_dir .. "/" .. service
    local st = fs.stat(dir)
    if st and st.type == "dir" then
      local record, err = deploy.load(dir)
      if record then
        records[#records + 1] = { dir = dir, run_dir = run_dir, record = record, key = time_key(record) }
      elseif not fs.exists(dir .. "/" .. MANIFEST) and not fs.exists(dir .. "/backup") then
        remove_dir(run_dir, dir) -- no record, no backup: apply stopped before changing anything
      else
        keep_dir(dir, "unreadable: " .. tostring(err))
      end
    end
  end

  -- Newest first; the first `keep` stay.
  table.sort(records, function(a, b)
    if a.key ~= b.key then return a.key > b.key end
    return a.dir > b.dir
  end)
  for i, r in ipairs(records) do
    if i <= keep then
      keep_dir(r.dir, "newest")
    elseif protected[state.canonical(r.dir, fs)] then
      keep_dir(r.dir, "protected")
    elseif r.record.state == "applying" or r.record.state == "failed" then
      keep_dir(r.dir, "unfinished")
    else
      remove_dir(r.run_dir, r.dir)
    end
  end

  for run_dir in pairs(touched_runs) do
    local left = fs.list(run_dir)
    if left and #left == 0 then
      fs.remove(run_dir, state.under(state_root))
    end
  end
  if #problems > 0 then
    return nil, table.concat(problems, "; "), result
  end
  return result
end

-- Exposed for the specs: the itemize parser is the part most tied to rsync's output.
deploy._parse_item = parse_item

return deploy
end

-- deploy.on(handle) -> the module acting on the files of handle's host (rr.hostfs).
local deploy = hostfs.per_host(make)

return deploy
