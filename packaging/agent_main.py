# The agent file's entry point: packaging/build_agent.py writes this as the archive's __main__.py
# with BUILD filled in. It runs first under whatever `python3` a host has, so it must parse on any
# of them (2.7 and 3.6 included: no f-strings, no annotations) and check the interpreter and host
# before importing anything of the build: an unsupported one gets one line and exit status 2.
# Then agent/cache.py (in the archive as _avika_cache) makes this interpreter's code importable,
# and the agent's CLI runs.
import os
import sys

BUILD = {}  # filled in by packaging/build_agent.py


def refusal():
    """Why this interpreter or host cannot run this build (one line), or None."""
    name = BUILD["name"] + " " + BUILD["version"] + " (" + BUILD["platform"] + ")"
    pythons = BUILD["pythons"]
    wanted = "CPython " + ", ".join(pythons[:-1]) + " or " + pythons[-1]
    implementation = getattr(getattr(sys, "implementation", None), "name", "python")
    here = ".".join(str(n) for n in sys.version_info[:3])
    tag = "cp" + str(sys.version_info[0]) + str(sys.version_info[1])
    if implementation != "cpython" or tag not in BUILD["tags"] or "t" in getattr(sys, "abiflags", ""):
        kind = "CPython" if implementation == "cpython" else implementation
        if "t" in getattr(sys, "abiflags", ""):
            kind += " (free-threaded)"
        return name + " runs on " + wanted + "; this is " + kind + " " + here + " (" + sys.executable + ")"
    machine = os.uname()[4].lower()
    if not sys.platform.startswith("linux") or machine not in BUILD["machines"]:
        return name + " is for " + BUILD["platform"] + " hosts; this one is " + sys.platform + " " + machine
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc = ""
    glibc = ".".join(str(n) for n in BUILD["glibc"])
    try:
        found = tuple(int(n) for n in libc.split()[1].split(".")[:2]) if libc.startswith("glibc ") else None
    except (IndexError, ValueError):
        found = None
    if found is None or found < tuple(BUILD["glibc"]):
        return name + " needs glibc >= " + glibc + "; this host has " + (libc or "another C library")
    return None


def main():
    why = refusal()
    if why is not None:
        sys.stderr.write(why + "\n")
        sys.exit(2)
    archive = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(archive, "cp" + str(sys.version_info[0]) + str(sys.version_info[1])))
    import _avika_cache

    try:
        _avika_cache.boot(archive, BUILD)
    except _avika_cache.CacheError as exc:
        sys.stderr.write("avika-agent: " + str(exc) + "\n")
        sys.exit(1)
    from agent.cli import entry

    entry()


if __name__ == "__main__":
    main()
