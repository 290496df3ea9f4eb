"""Inside a sandbox: start an OpenSSH server for ``ssh root@<sandbox-id>`` and let the caller's keys in.

This file runs INSIDE the guest, as root: the host sends its text through the guest agent
(``python3 -I -c <this file> <sandbox id>``, see :mod:`trenvx.guest.sshd`), so it works in any
sandbox, whatever agent its template was built with. Standard library only, no trenvx import,
nothing newer than Python 3.7.

Input, a JSON object on stdin: ``keys`` (OpenSSH public key lines, checked by the host) and
``users`` (accounts to let them into; ones the image lacks are skipped). Output, one JSON object on
stdout: ``hostKeys`` (this sandbox's host public keys), ``sshd`` (``started`` or ``running``),
``users`` (the accounts whose ``authorized_keys`` hold the keys); or, with exit code 2,
``{"error": ..., "code": "no_sshd" | "failed"}``.

What it keeps in :data:`STATE_DIR` (``/etc/trenvx-ssh``, root only):

- **A host key of this sandbox's own.** Sandboxes start from one snapshot, so host keys made at
  build time (Debian's openssh-server makes them on install) would be every sandbox's. The key
  here is made on the first ssh into a sandbox and belongs to its id (``sandbox-id``): a fork or a
  sandbox started from a snapshot of this one has another id, so it makes its own key and restarts
  the sshd it inherited (which holds the old key in memory).
- **sshd's config**: key authentication only (root by key, no passwords, no keyboard-interactive),
  SFTP built in (``scp`` of OpenSSH 9 speaks SFTP), TCP forwarding on (``ssh -L``), no DNS lookups.
- sshd's pid file and log (``sshd.log``: why a start failed, why a login was refused).

sshd is started on demand, never before the first ssh: an idle sandbox runs no sshd. Keys are
written into a non-root account's ``~/.ssh`` by a child process running as that account, so a
link planted in a user's home cannot make root write anywhere else.
"""

import fcntl
import json
import os
import pwd
import signal
import subprocess
import sys
import time

STATE_DIR = "/etc/trenvx-ssh"
HOST_KEY = STATE_DIR + "/ssh_host_ed25519_key"
CONFIG = STATE_DIR + "/sshd_config"
OWNER = STATE_DIR + "/sandbox-id"
PIDFILE = STATE_DIR + "/sshd.pid"
LOG = STATE_DIR + "/sshd.log"
LOCK = STATE_DIR + "/lock"
PRIVSEP_DIRS = ("/run/sshd", "/var/empty")
"""sshd's privilege separation directory: Debian's is /run/sshd (a tmpfs, empty after a boot), others /var/empty."""
SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd")
KEYGEN_PATHS = ("/usr/bin/ssh-keygen", "/usr/local/bin/ssh-keygen", "/bin/ssh-keygen")
START_WAIT_S = 10.0
COMMAND_TIMEOUT_S = 60

CONFIG_TEXT = """\
# Written by trenvx for `ssh root@<sandbox-id>` through the trenvx backend (src/trenvx/guest/sshd_setup.py);
# rewritten on every ssh into this sandbox.
Port 22
HostKey {host_key}
PidFile {pidfile}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
AuthenticationMethods publickey
AuthorizedKeysFile .ssh/authorized_keys
UsePAM {use_pam}
StrictModes yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
UseDNS no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
"""


class Failure(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def first_existing(paths):
    for p in paths:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def run(argv):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=COMMAND_TIMEOUT_S, close_fds=True)


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def write_file(path, text, mode):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def our_sshd_pid():
    """The pid of the sshd this script started, if it runs (its pid file names it and its command line names our config)."""
    text = read_text(PIDFILE).strip()
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    # sshd retitles its listener ("sshd: /usr/sbin/sshd -f CONFIG ... [listener] ..."): the path is in the text
    return pid if b"sshd" in cmdline and CONFIG.encode() in cmdline else None


def stop_sshd(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists("/proc/%d" % pid):
        time.sleep(0.02)
    try:
        os.unlink(PIDFILE)
    except OSError:
        pass


def account_locked(name):
    """Whether ``name``'s password field starts with ``!`` (sshd without PAM refuses such accounts even for keys)."""
    for line in read_text("/etc/shadow").splitlines():
        fields = line.split(":")
        if len(fields) > 1 and fields[0] == name:
            return fields[1].startswith("!")
    return False


def ensure_host_key(sandbox_id, keygen):
    """This sandbox's host key (made now if it has none or inherited another sandbox's); True if made now."""
    if read_text(OWNER).strip() == sandbox_id and os.path.isfile(HOST_KEY) and os.path.isfile(HOST_KEY + ".pub"):
        return False
    for path in (HOST_KEY, HOST_KEY + ".pub"):
        try:
            os.unlink(path)
        except OSError:
            pass
    done = run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "root@" + sandbox_id, "-f", HOST_KEY])
    if done.returncode != 0:
        raise Failure("failed", "ssh-keygen could not make the sandbox's host key: "
                      + (done.stderr or done.stdout).decode(errors="replace").strip()[-500:])
    write_file(OWNER, sandbox_id + "\n", 0o600)
    return True


def start_sshd(sshd, users):
    use_pam = "yes" if os.path.isfile("/etc/pam.d/sshd") and any(account_locked(u) for u in users) else "no"
    write_file(CONFIG, CONFIG_TEXT.format(host_key=HOST_KEY, pidfile=PIDFILE, use_pam=use_pam), 0o600)
    for d in PRIVSEP_DIRS:
        if not os.path.isdir(d):
            try:
                os.makedirs(d, 0o755)
            except OSError:
                pass
    try:
        os.unlink(PIDFILE)
    except OSError:
        pass
    done = run([sshd, "-f", CONFIG, "-E", LOG])
    if done.returncode != 0:
        log_tail = "\n".join(read_text(LOG).strip().splitlines()[-5:])
        output = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise Failure("failed", "sshd did not start (exit %d): %s" % (done.returncode, (output + "\n" + log_tail).strip()[-1500:]))
    deadline = time.time() + START_WAIT_S
    while our_sshd_pid() is None:  # the daemon writes its pid file once it listens
        if time.time() > deadline:
            raise Failure("failed", "sshd started but wrote no pid file within %gs; its log: %s"
                          % (START_WAIT_S, read_text(LOG).strip()[-1000:]))
        time.sleep(0.02)


def merge_keys(existing, keys):
    """``existing`` authorized_keys text plus the keys it lacks (compared by type and blob)."""
    have = set()
    for line in existing.splitlines():
        parts = line.split()
        for i in range(len(parts) - 1):  # options may come first: find the type, the blob follows
            have.add((parts[i], parts[i + 1]))
    missing = [k for k in keys if tuple(k.split()[:2]) not in have]
    if not missing:
        return None
    text = existing if not existing or existing.endswith("\n") else existing + "\n"
    return text + "".join(k + "\n" for k in missing)


def install_keys_here(home, keys):
    """Add ``keys`` to ``home``/.ssh/authorized_keys as the current user (made 0700/0600 if missing)."""
    ssh_dir = os.path.join(home, ".ssh")
    if not os.path.isdir(ssh_dir):
        os.makedirs(ssh_dir, 0o700)
    if os.path.islink(ssh_dir):
        raise OSError("%s is a symbolic link" % ssh_dir)
    path = os.path.join(ssh_dir, "authorized_keys")
    merged = merge_keys(read_text(path) if not os.path.islink(path) else "", keys)
    if merged is not None:
        write_file(path, merged, 0o600)


def install_keys(user, keys):
    """Let ``keys`` log in as ``user``; False if the image has no such account."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return False
    if pw.pw_uid == 0:
        install_keys_here(pw.pw_dir, keys)
        return True
    pid = os.fork()
    if pid == 0:  # the child becomes the account and writes as it
        code = 1
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            install_keys_here(pw.pw_dir, keys)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported by the exit code and stderr
            sys.stderr.write("cannot add the key for %s: %s\n" % (user, e))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True
    raise Failure("failed", "could not add the public key to %s's ~/.ssh/authorized_keys" % user)


def main(argv):
    if len(argv) != 2:
        raise Failure("failed", "usage: sshd_setup.py SANDBOX_ID < {\"keys\": [...], \"users\": [...]}")
    sandbox_id = argv[1]
    request = json.loads(sys.stdin.read() or "{}")
    keys = [str(k).strip() for k in request.get("keys") or []]
    users = [str(u) for u in request.get("users") or ["root"]]
    if os.geteuid() != 0:
        raise Failure("failed", "sshd_setup must run as root")
    sshd = first_existing(SSHD_PATHS)
    if sshd is None:
        raise Failure("no_sshd", "no OpenSSH server in this sandbox (looked for %s)" % ", ".join(SSHD_PATHS))
    keygen = first_existing(KEYGEN_PATHS)
    if keygen is None:
        raise Failure("no_sshd", "no ssh-keygen in this sandbox (looked for %s)" % ", ".join(KEYGEN_PATHS))
    if not os.path.isdir(STATE_DIR):
        os.makedirs(STATE_DIR, 0o700)
    os.chmod(STATE_DIR, 0o700)
    lock = os.open(LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # two ssh at once: one starts sshd, the other finds it running
    try:
        installed = [u for u in users if install_keys(u, keys)]
        new_key = ensure_host_key(sandbox_id, keygen)
        pid = our_sshd_pid()
        if pid is not None and new_key:
            stop_sshd(pid)  # inherited from the sandbox this one was copied from, with its key
            pid = None
        state = "running"
        if pid is None:
            start_sshd(sshd, users)
            state = "started"
        host_keys = [read_text(HOST_KEY + ".pub").strip()]
    finally:
        os.close(lock)
    return {"hostKeys": host_keys, "sshd": state, "users": installed}


if __name__ == "__main__":
    try:
        result = main(sys.argv)
    except Failure as e:
        print(json.dumps({"error": e.message, "code": e.code}))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - said to the host, which reports it
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e), "code": "failed"}))
        sys.exit(2)
    print(json.dumps(result))
