# Install vfiocaps: the Python package and the system integration files.
#
#   make install DESTDIR=/tmp/stage PREFIX=/usr PYTHON=/usr/bin/python3
#   make uninstall DESTDIR=/tmp/stage PREFIX=/usr PYTHON=/usr/bin/python3
#
# The package goes into $(PYTHON)'s own site layout under PREFIX, the way a distribution
# package installs it: pip --root/--prefix, no dependencies (they come from the distribution:
# dbus-fast, qemu.qmp, pyudev, aiosqlite), built offline with the interpreter's setuptools and
# wheel. With Debian's interpreter that is $(PREFIX)/lib/python3/dist-packages and
# $(PREFIX)/bin. The programs land in $(PREFIX)/bin, which the unit and the bus activation
# file name; uninstall removes exactly what install put in place.

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
# libvirt (6.5 and later) runs every executable here; it reads no hook from under PREFIX.
LIBVIRTHOOKDIR ?= /etc/libvirt/hooks/qemu.d

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

.PHONY: all install install-python install-data uninstall clean

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
	$(INSTALL) -D -m 0755 libvirt/hooks/qemu.d/vfiocaps $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiocaps
	$(INSTALL) -D -m 0644 man/vfiocapsctl.1 $(DESTDIR)$(MANDIR)/man1/vfiocapsctl.1
	$(INSTALL) -D -m 0644 man/vfiocapsd.8 $(DESTDIR)$(MANDIR)/man8/vfiocapsd.8
	$(INSTALL) -D -m 0644 completion/vfiocapsctl $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsctl
	$(INSTALL) -D -m 0644 completion/vfiocapsd $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsd

uninstall:
	@test -n "$(VERSION)" || { echo "cannot read the version from pyproject.toml" >&2; exit 1; }
	rm -f $(DESTDIR)$(UNITDIR)/vfiocapsd.service
	rm -f $(DESTDIR)$(SYSUSERSDIR)/vfiocaps.conf
	rm -f $(DESTDIR)$(UDEVRULESDIR)/70-vfiocaps.rules
	rm -f $(DESTDIR)$(DBUSPOLICYDIR)/org.vfiocaps.conf
	rm -f $(DESTDIR)$(DBUSSERVICEDIR)/org.vfiocaps.service
	rm -f $(DESTDIR)$(POLKITACTIONDIR)/org.vfiocaps.policy
	rm -f $(DESTDIR)$(LIBVIRTHOOKDIR)/vfiocaps
	rm -f $(DESTDIR)$(MANDIR)/man1/vfiocapsctl.1 $(DESTDIR)$(MANDIR)/man8/vfiocapsd.8
	rm -f $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsctl $(DESTDIR)$(BASHCOMPLETIONDIR)/vfiocapsd
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(PROGRAMS))
	rm -rf $(DESTDIR)$(PURELIB)/vfiocaps $(DESTDIR)$(PURELIB)/vfiocaps-$(VERSION).dist-info

clean:
	rm -rf $(BUILDDIR)
