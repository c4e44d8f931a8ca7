# rrengine — build, test, install. `make help` lists the targets.
CC       ?= cc
PREFIX   ?= /usr/local
DESTDIR  ?=
BINDIR   ?= $(PREFIX)/bin
DATADIR  ?= $(PREFIX)/share/rrengine
MANDIR   ?= $(PREFIX)/share/man
DOCDIR   ?= $(PREFIX)/share/doc/rrengine
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
# zsh looks in vendor-completions for /usr (Debian), in site-functions elsewhere
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/$(if $(filter /usr,$(PREFIX)),vendor-completions,site-functions)
VERSION  ?= 0.1.0
PKGS     := lua5.4 libsystemd libcurl readline libcrypto
CFLAGS   ?= -O2 -g
WARNINGS := -Wall -Wextra -Werror -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
            -Wpointer-arith -Wformat=2 -Wundef -Wvla -Wwrite-strings
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS   = $(shell pkg-config --libs $(PKGS))
ALL_CFLAGS = -std=gnu11 $(WARNINGS) $(CFLAGS) $(PKG_CFLAGS) \
             -DRR_VERSION='"$(VERSION)"' -DRR_DATADIR='"$(DATADIR)"'
SAN_FLAGS  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Debian packages the project needs (build, run, test).
DEB_PACKAGES := gcc make pkg-config lua5.4 liblua5.4-dev libsystemd-dev libcurl4-openssl-dev diffutils patch \
                libreadline-dev libssl-dev lua-cjson lua-busted rsync dbus-user-session systemd curl \
                scdoc groff-base man-db bash-completion zsh libxml2-utils graphviz \
                debhelper dpkg-dev haproxy wrk openssh-server openssh-client

SRCS    := $(wildcard engine/*.c)
HDRS    := $(wildcard engine/*.h)
SPEC    ?= spec
V       ?= 0
Q       := $(if $(filter 1,$(V)),,@)

.PHONY: FORCE all deps check check-asan check-valgrind bench demo demo-hosts man install uninstall deb deb-check clean help

all: rrengine build/fixture

# The installed engine finds its Lua library under DATADIR: rebuild when PREFIX changes.
build/datadir.stamp: FORCE
	@mkdir -p build
	@echo '$(DATADIR) $(VERSION)' | cmp -s - $@ || echo '$(DATADIR) $(VERSION)' > $@

rrengine: $(SRCS) $(HDRS) Makefile build/datadir.stamp
	@echo "  CC      $@"
	$(Q)$(CC) $(ALL_CFLAGS) -o $@ $(SRCS) $(LDFLAGS) $(PKG_LIBS)

rrengine-asan: $(SRCS) $(HDRS) Makefile build/datadir.stamp
	@echo "  CC      $@ (ASan+UBSan)"
	$(Q)$(CC) $(ALL_CFLAGS) -O1 $(SAN_FLAGS) -o $@ $(SRCS) $(LDFLAGS) $(PKG_LIBS)

build/fixture: spec/support/fixture.c Makefile
	@mkdir -p build
	@echo "  CC      $@"
	$(Q)$(CC) -std=gnu11 $(WARNINGS) $(CFLAGS) -o $@ $< $(shell pkg-config --cflags --libs libsystemd)

# Installs exactly what is missing, quietly when everything is there.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "  APT     $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Every spec, against a sandboxed real systemd user manager.
check: all
	$(Q)spec/support/run-specs ./rrengine $(SPEC)

check-asan: all rrengine-asan
	$(Q)ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=99 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  spec/support/run-specs ./rrengine-asan $(SPEC)

check-valgrind: all
	$(Q)RR_VALGRIND=1 spec/support/run-specs ./rrengine $(SPEC)

# The whole job, timed: see bench/README.md. build/benchtime reports a child's rusage in µs.
bench: all build/benchtime
	$(Q)spec/support/sandbox run -- ./rrengine bench/run.lua

build/benchtime: bench/benchtime.c Makefile
	@mkdir -p build
	@echo "  CC      $@"
	$(Q)$(CC) -std=gnu11 $(WARNINGS) $(CFLAGS) -o $@ $<

demo: deps all
	$(Q)./demo/run && ./rrengine demo/hosts.lua

# The second part of the demo alone: one platform on two test hosts (sshd + a user manager each).
demo-hosts: deps all
	$(Q)./rrengine demo/hosts.lua

# Manual pages from their scdoc sources, with this build's paths filled in.
MANPAGES := build/man/rrengine.1 build/man/rrengine-services.5
man: $(MANPAGES)

build/man/%: man/%.scd build/datadir.stamp
	@mkdir -p build/man
	@echo "  SCDOC   $@"
	$(Q)sed -e 's|@DATADIR@|$(DATADIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' $< | scdoc > $@.tmp && mv $@.tmp $@

# The engine, its library, plans and example hooks (the services example refers to hooks/ beside
# it), manual pages, shell completion, documentation and the example logrotate and timer files.
install: rrengine man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(DATADIR)/lua/rr $(DESTDIR)$(DATADIR)/plans $(DESTDIR)$(DATADIR)/hooks \
	  $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) \
	  $(DESTDIR)$(DOCDIR)/examples
	install -m 0755 rrengine $(DESTDIR)$(BINDIR)/rrengine
	install -m 0644 lua/rr/*.lua $(DESTDIR)$(DATADIR)/lua/rr/
	install -m 0644 plans/*.lua $(DESTDIR)$(DATADIR)/plans/
	install -m 0644 hooks/*.lua $(DESTDIR)$(DATADIR)/hooks/
	install -m 0644 services.lua $(DESTDIR)$(DATADIR)/services.example.lua
	install -m 0644 build/man/rrengine.1 $(DESTDIR)$(MANDIR)/man1/rrengine.1
	install -m 0644 build/man/rrengine-services.5 $(DESTDIR)$(MANDIR)/man5/rrengine-services.5
	install -m 0644 completion/rrengine.bash $(DESTDIR)$(BASHCOMPDIR)/rrengine
	sed 's|@BASHCOMPDIR@|$(BASHCOMPDIR)|g' completion/_rrengine > $(DESTDIR)$(ZSHCOMPDIR)/_rrengine
	chmod 0644 $(DESTDIR)$(ZSHCOMPDIR)/_rrengine
	install -m 0644 README.md docs/scripting.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 contrib/rrengine.logrotate contrib/systemd/rrengine-restart@.timer $(DESTDIR)$(DOCDIR)/examples/
	sed 's|/usr/bin/rrengine|$(BINDIR)/rrengine|g' contrib/systemd/rrengine-restart@.service \
	  > $(DESTDIR)$(DOCDIR)/examples/rrengine-restart@.service
	chmod 0644 $(DESTDIR)$(DOCDIR)/examples/rrengine-restart@.service

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/rrengine $(DESTDIR)$(MANDIR)/man1/rrengine.1 $(DESTDIR)$(MANDIR)/man5/rrengine-services.5 \
	  $(DESTDIR)$(BASHCOMPDIR)/rrengine $(DESTDIR)$(ZSHCOMPDIR)/_rrengine
	rm -rf $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)

# The Debian package, built from a copy of the tree (tracked and new files) in build/deb/src,
# so that dpkg-buildpackage leaves nothing in the tree or beside it: build/deb/rrengine_*.deb.
deb:
	rm -rf build/deb && mkdir -p build/deb/src
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git ls-files -z --cached --others --exclude-standard | rsync -a --from0 --files-from=- --ignore-missing-args ./ build/deb/src/; \
	else \
	  rsync -a --exclude=/build --exclude=/.git --exclude=/rrengine --exclude=/rrengine-asan ./ build/deb/src/; \
	fi
	cd build/deb/src && dpkg-buildpackage -b -us -uc
	@ls build/deb/*.deb

# Builds the package, installs it for real with dpkg in a throwaway copy of this machine (an
# overlay of /), runs it from another directory, purges it and checks that nothing is left.
deb-check: all
	$(Q)spec/support/run-specs ./rrengine spec/package_spec.lua

clean:
	rm -rf rrengine rrengine-asan build

help:
	@echo "make deps | make | make check | make check-asan | make check-valgrind | make bench | make demo | make demo-hosts | make man | make install [PREFIX=... DESTDIR=...] | make uninstall | make deb | make deb-check | make clean"
