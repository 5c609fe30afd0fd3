# Install vfiocaps: the Python package and the system integration files (docs/install.md).
#
#   make deb                      the Debian package dist/vfiocaps_<version>_all.deb
#   make install-private install-data DESTDIR=/tmp/stage PREFIX=/usr
#                                 the package's layout without a package: the programs and the
#                                 pinned dependencies in their own module directory
#   make install DESTDIR=/tmp/stage PREFIX=/usr PYTHON=/usr/bin/python3
#   make uninstall DESTDIR=/tmp/stage PREFIX=/usr PYTHON=/usr/bin/python3
#
# install: the package goes into $(PYTHON)'s own site layout under PREFIX, the way a
# distribution package installs it: pip --root/--prefix, no dependencies (they come from the
# distribution: dbus-fast, qemu.qmp, pyudev, aiosqlite at the versions pyproject.toml names,
# which Debian 12 does not have), built offline with the interpreter's setuptools and wheel.
# With Debian's interpreter that is $(PREFIX)/lib/python3/dist-packages and $(PREFIX)/bin.
# The programs land in $(PREFIX)/bin, which the unit and the bus activation file name;
# uninstall removes exactly what install put in place.
#
# install-private: the package and the dependencies pinned in scripts/vendor-requirements.txt
# (all pure Python, as wheels in WHEELDIR, made by `make wheels`, the only step that reads the
# package index, through pip) go into PYTHONDIR; launchers in BINDIR run the system's
# interpreter (SYSTEM_PYTHON) isolated with PYTHONDIR first on its path. This is what the
# Debian package installs.

# /usr, not /usr/local: udev rules, the bus policy and polkit actions are read only from fixed
# directories under /usr (and /etc), so under /usr/local they would be installed but ignored.
PREFIX ?= /usr
DESTDIR ?=
PYTHON ?= python3
INSTALL ?= install

BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
UDEVRULESDIR ?= $(PREFIX)/lib/udev/rules.d
DBUSPOLICYDIR ?= $(PREFIX)/share/dbus-1/system.d
DBUSSERVICEDIR ?= $(PREFIX)/share/dbus-1/system-services
POLKITACTIONDIR ?= $(PREFIX)/share/polkit-1/actions
MANDIR ?= $(PREFIX)/share/man
BASHCOMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
DBUSINTERFACEDIR ?= $(PREFIX)/share/dbus-1/interfaces
# The libvirt hook is configuration (under /etc whatever the prefix), installed when the
# checkout has it.
SYSCONFDIR ?= /etc
LIBVIRTHOOKDIR ?= $(SYSCONFDIR)/libvirt/hooks/qemu.d
LIBVIRTHOOK = libvirt/hooks/qemu.d/vfiocaps
# The private module directory of install-private (architecture-independent: pure Python).
PYTHONDIR ?= $(PREFIX)/share/vfiocaps
SYSTEM_PYTHON ?= /usr/bin/python3
WHEELDIR ?= build/wheels
VENDOR_REQUIREMENTS = scripts/vendor-requirements.txt
DISTDIR ?= dist

BUILDDIR ?= build/system
PIP_FLAGS ?= --no-deps --no-build-isolation --no-index --ignore-installed \
	--disable-pip-version-check --no-warn-script-location --root-user-action=ignore

VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
# Debian's interpreter installs a --prefix=/usr package under /usr/local unless told to use
# the distribution layout; other interpreters and virtual environments ignore this variable.
# (make does not hand exported variables to $(shell), hence the repetition.)
export DEB_PYTHON_INSTALL_LAYOUT = deb_system
PURELIB = $(shell DEB_PYTHON_INSTALL_LAYOUT=deb_system $(PYTHON) -c 'import sysconfig; \
	p = "$(PREFIX)"; \
	print(sysconfig.get_path("purelib", sysconfig.get_preferred_scheme("prefix"), \
	      vars={"base": p, "platbase": p}))')

GENERATED = $(BUILDDIR)/vfiocapsd.service $(BUILDDIR)/org.vfiocaps.service
PROGRAMS = vfiocapsd vfiocapsctl

.PHONY: all install install-python install-data install-private uninstall wheels deb clean

all: $(GENERATED)

$(BUILDDIR)/vfiocapsd.service: systemd/vfiocapsd.service.in Makefile
	@mkdir -p $(BUILDDIR)
	sed 's|@bindir@|$(BINDIR)|g' $< > $@

$(BUILDDIR)/org.vfiocaps.service: dbus/org.vfiocaps.service.in Makefile
	@mkdir -p $(BUILDDIR)
	sed 's|@bindir@|$(BINDIR)|g' $< > $@

# The substituted files depend on BINDIR: always regenerate them for an install.
install: install-python install-data

install-python:
	@test -n "$(VERSION)" || { echo "cannot read the version from pyproject.toml" >&2; exit 1; }
	$(PYTHON) -m pip install $(PIP_FLAGS) --root="$(or $(DESTDIR),/)" --prefix="$(PREFIX)" .
	@for program in $(PROGRAMS); do \
		test -x "$(DESTDIR)$(BINDIR)/$$program" || { \
			echo "pip did not put $$program in $(BINDIR); set BINDIR" >&2; exit 1; }; \
	done

install-data:
	rm -f $(GENERATED)
	$(MAKE) --no-print-directory all BINDIR="$(BINDIR)" BUILDDIR="$(BUILDDIR)"
	$(INSTALL) -D -m 0644 $(BUILDDIR)/vfiocapsd.service $(DESTDIR)$(UNITDIR)/vfiocapsd.service
	$(INSTALL) -D -m 0644 systemd/vfiocaps.sysusers $(DESTDIR)$(SYSUSERSDIR)/vfiocaps.conf
	$(INSTALL) -D -m 0644 systemd/70-vfiocaps.rules $(DESTDIR)$(UDEVRULESDIR)/70-vfiocaps.rules
	$(INSTALL) -D -m 0644 dbus/org.vfiocaps.conf $(DESTDIR)$(DBUSPOLICYDIR)/org.vfiocaps.conf
	$(INSTALL) -D -m 0644 $(BUILDDIR)/org.vfiocaps.service \
		$(DESTDIR)$(DBUSSERVICEDIR)/org.vfiocaps.service
	$(INSTALL) -D -m 0644 polkit/org.vfiocaps.policy \
		$(DESTDIR)$(POLKITACTIONDIR)/org.vfiocaps.policy
	$(INSTALL) -D -m 0644 man/vfiocapsctl.1 $(DESTDIR)$(MANDIR)/man1/vfiocapsctl.1
	$(INSTALL) -D -m 0644 man/vfiocapsd.8 $(DESTDIR)$(MANDIR)/man8/vfiocapsd.8
	$(INSTALL) -D -m 0644 completion/vfiocapsctl $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsctl
	$(INSTALL) -D -m 0644 completion/vfiocapsd $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsd
	$(INSTALL) -D -m 0644 dbus/org.vfiocaps1.xml $(DESTDIR)$(DBUSINTERFACEDIR)/org.vfiocaps1.xml
	if [ -f $(LIBVIRTHOOK) ]; then \
		$(INSTALL) -D -m 0755 $(LIBVIRTHOOK) $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiocaps; fi

# The pinned dependencies as pure-Python wheels; rebuilt when the pins change. dbus-fast comes
# from its source without its optional Cython extensions; the build runs in a scratch
# directory and replaces WHEELDIR only when complete.
wheels: $(WHEELDIR)/.complete

$(WHEELDIR)/.complete: $(VENDOR_REQUIREMENTS)
	@mkdir -p $(dir $(WHEELDIR))
	set -e; scratch=$$(mktemp -d "$(WHEELDIR).XXXXXX"); trap 'rm -rf "$$scratch"' EXIT; \
	SKIP_CYTHON=1 $(SYSTEM_PYTHON) -m pip wheel --quiet --no-deps --no-cache-dir \
		--disable-pip-version-check --no-binary dbus-fast \
		--wheel-dir "$$scratch" -r $(VENDOR_REQUIREMENTS); \
	$(SYSTEM_PYTHON) -c 'import sys, zipfile; \
		compiled = [f"{w}: {n}" for w in sys.argv[1:] for n in zipfile.ZipFile(w).namelist() \
		            if n.endswith((".so", ".pyd"))]; \
		sys.exit("compiled code, the package must be pure Python:\n" + "\n".join(compiled) \
		         if compiled else 0)' "$$scratch"/*.whl; \
	cp $(VENDOR_REQUIREMENTS) "$$scratch/.complete"; \
	chmod 0755 "$$scratch"; rm -rf $(WHEELDIR); mv "$$scratch" $(WHEELDIR)

# Offline: only the wheels in WHEELDIR and the checkout, built with the interpreter's
# setuptools. Replaces PYTHONDIR as a whole, so no module of an older install stays behind.
install-private: $(WHEELDIR)/.complete
	@test -n "$(VERSION)" || { echo "cannot read the version from pyproject.toml" >&2; exit 1; }
	rm -rf "$(DESTDIR)$(PYTHONDIR)"
	PYTHONDONTWRITEBYTECODE=1 $(SYSTEM_PYTHON) -m pip install $(PIP_FLAGS) \
		--no-compile --target="$(DESTDIR)$(PYTHONDIR)" $(WHEELDIR)/*.whl .
	rm -rf "$(DESTDIR)$(PYTHONDIR)/bin"
	find "$(DESTDIR)$(PYTHONDIR)" -name __pycache__ -prune -exec rm -rf {} +
	$(SYSTEM_PYTHON) scripts/write-launchers "$(PYTHONDIR)" "$(BINDIR)" "$(SYSTEM_PYTHON)" \
		"$(DESTDIR)"

# The Debian package, built by dpkg-buildpackage and debhelper (debian/) from a copy of the
# checkout in a scratch directory, so that the checkout stays clean and two builds do not
# meet; the .deb goes to DISTDIR.
deb: $(WHEELDIR)/.complete
	@test "$$(dpkg-parsechangelog -SVersion)" = "$(VERSION)" || { \
		echo "debian/changelog's version is not pyproject.toml's $(VERSION)" >&2; exit 1; }
	@mkdir -p build $(DISTDIR)
	set -e; scratch=$$(mktemp -d "$(CURDIR)/build/deb.XXXXXX"); \
	trap 'rm -rf "$$scratch"' EXIT; \
	tree="$$scratch/vfiocaps-$(VERSION)"; mkdir -p "$$tree/build"; \
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude='*/__pycache__' --exclude=./.mypy_cache --exclude=./.ruff_cache \
		--exclude=./.pytest_cache --exclude=./.hypothesis --exclude='*.egg-info' . | \
		tar -C "$$tree" -xf -; \
	cp -r $(WHEELDIR) "$$tree/build/wheels"; \
	(cd "$$tree" && PIP_NO_INDEX=1 dpkg-buildpackage --build=binary --no-sign >&2); \
	cp "$$scratch"/vfiocaps_$(VERSION)_*.deb $(DISTDIR)/; \
	ls $(DISTDIR)/vfiocaps_$(VERSION)_*.deb

uninstall:
	@test -n "$(VERSION)" || { echo "cannot read the version from pyproject.toml" >&2; exit 1; }
	rm -f $(DESTDIR)$(UNITDIR)/vfiocapsd.service
	rm -f $(DESTDIR)$(SYSUSERSDIR)/vfiocaps.conf
	rm -f $(DESTDIR)$(UDEVRULESDIR)/70-vfiocaps.rules
	rm -f $(DESTDIR)$(DBUSPOLICYDIR)/org.vfiocaps.conf
	rm -f $(DESTDIR)$(DBUSSERVICEDIR)/org.vfiocaps.service
	rm -f $(DESTDIR)$(POLKITACTIONDIR)/org.vfiocaps.policy
	rm -f $(DESTDIR)$(MANDIR)/man1/vfiocapsctl.1 $(DESTDIR)$(MANDIR)/man8/vfiocapsd.8
	rm -f $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsctl $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsd
	rm -f $(DESTDIR)$(DBUSINTERFACEDIR)/org.vfiocaps1.xml
	if [ -f $(LIBVIRTHOOK) ]; then rm -f $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiocaps; fi
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(PROGRAMS))
	rm -rf $(DESTDIR)$(PURELIB)/vfiocaps $(DESTDIR)$(PURELIB)/vfiocaps-$(VERSION).dist-info

clean:
	rm -rf $(BUILDDIR) $(WHEELDIR)
