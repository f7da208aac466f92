#!/usr/bin/env python3
"""Writes labelled synthetic operations incidents for the ops-triage example.

  python3 scripts/examples/make_incidents.py [OUT_DIR]   (default examples/ops)

OUT_DIR/incidents/NN/{alert.json,app.log,metrics.json} and OUT_DIR/labels.json.
Deterministic (random.Random(2026)).  8 categories x 3 variants = 24 incidents,
each a different root cause.  The telling log lines sit among the routine
lines of the plc-bridge service; the metrics agree with the category (only
the affected resource is off).  Half the alerts have a generic name
(ServiceDegraded, DeviceUnhealthy, ...) so the category has to be read from
the evidence.  Each incident stays under 3,000 bytes of text (alert + log +
metrics) so it fits a 0.5B model's 4k-token context with room for a prompt.
"""
import json
import os
import random
import sys
from datetime import datetime, timedelta, timezone

DEVICE = "pi-line-3"
BUDGET = 3000
CATEGORIES = ["disk_full", "memory_exhaustion", "network_loss", "service_crash",
              "sensor_fault", "overheating", "certificate_expired", "config_error"]
GENERIC_ALERTS = ["ServiceDegraded", "DeviceUnhealthy", "DataGap", "PublishBacklog"]

# Routine lines of a healthy plc-bridge: {n}, {ms}, {k} are filled at random.
NOISE = [
    ("INFO", "poll", "plc-1: read {n} holding registers in {ms} ms"),
    ("INFO", "poll", "plc-2: read {n} input registers in {ms} ms"),
    ("INFO", "mqtt", "published batch of {k} samples to plant/line3/telemetry"),
    ("DEBUG", "buffer", "segment seg-{k:04d} committed ({n} records)"),
    ("INFO", "health", "heartbeat ok, queue {n}"),
    ("DEBUG", "poll", "plc-1: coil 12 unchanged"),
    ("INFO", "ntp", "clock offset {ms} us"),
    ("WARN", "poll", "plc-2: slow response {ms}0 ms (retrying once)"),
    ("INFO", "mqtt", "keepalive ack from broker in {ms} ms"),
]

# category -> 3 variants: (specific alert, severity, summary, root cause, fix,
#   telling log lines [(level, component, message)], metric overrides)
VARIANTS = {
    "disk_full": [
        ("DiskSpaceLow", "critical", "Root filesystem above 99% on pi-line-3",
         "Debug logging left on filled /var/log with plc-bridge debug.log.",
         "truncate -s 0 /var/log/plc-bridge/debug.log; set log_level=info; journalctl --vacuum-size=100M",
         [("WARN", "log", "debug.log is 27.8 GiB, rotation skipped (keep_debug=true)"),
          ("ERROR", "buffer", "write seg-{k:04d}: No space left on device (os error 28)"),
          ("ERROR", "buffer", "flush failed, {n} samples dropped")],
         {"disk_free": 18_000_000}),
        ("DiskSpaceLow", "warning", "Telemetry from pi-line-3 stalled",
         "The offline buffer kept every segment after upstream outages and filled the disk.",
         "find /var/lib/plc-bridge/buffer -name 'seg-*' -mtime +2 -delete; systemctl restart plc-bridge",
         [("WARN", "buffer", "retention not applied: 4211 segments pending upload"),
          ("ERROR", "buffer", "fsync seg-{k:04d}: ENOSPC"),
          ("ERROR", "sqlite", "database or disk is full")],
         {"disk_free": 4_096_000}),
        (None, "critical", "pi-line-3 reports errors",
         "Repeated crashes left large core dumps in /var/lib/systemd/coredump.",
         "rm -f /var/lib/systemd/coredump/core.*; echo 'Storage=none' >> /etc/systemd/coredump.conf",
         [("WARN", "systemd-coredump", "core.plc-bridge.1204 saved (1.9G)"),
          ("ERROR", "buffer", "write seg-{k:04d}: No space left on device (os error 28)"),
          ("ERROR", "journald", "Failed to write entry, ignoring: No space left on device")],
         {"disk_free": 0}),
    ],
    "memory_exhaustion": [
        ("HighMemoryUsage", "critical", "Available memory under 2% on pi-line-3",
         "The in-memory publish queue grows without bound while the broker is slow, until the OOM killer ends plc-bridge.",
         "set queue_max=10000 in /etc/plc-bridge/config.toml; systemctl restart plc-bridge",
         [("WARN", "mqtt", "publish queue length {n}0000 and rising"),
          ("ERROR", "kernel", "Out of memory: Killed process 812 (plc-bridge) total-vm:3.1G"),
          ("INFO", "systemd", "plc-bridge.service: A process of this unit has been killed by the OOM killer.")],
         {"mem_avail": 38_000}),
        ("SwapUsageHigh", "warning", "pi-line-3 sluggish, polls late",
         "A memory leak in the register decoder cache (one entry per poll) exhausted RAM and swap.",
         "systemctl restart plc-bridge; set MemoryMax=512M in a drop-in; upgrade to the fixed release",
         [("WARN", "decode", "cache entries={n}0412 (expected < 500)"),
          ("WARN", "kernel", "kswapd0: page allocation stall for 4211ms"),
          ("ERROR", "poll", "plc-1: cannot allocate memory for frame buffer")],
         {"mem_avail": 21_000}),
        (None, "critical", "pi-line-3 rebooted unexpectedly",
         "A stray debug tool (tcpdump to tmpfs /tmp) filled RAM-backed /tmp and starved memory.",
         "pkill -x tcpdump; rm -f /tmp/capture*.pcap; systemctl restart plc-bridge",
         [("INFO", "sshd", "session opened for user maint"),
          ("WARN", "kernel", "tmpfs /tmp: 3.3G used by capture-1.pcap"),
          ("ERROR", "kernel", "Out of memory: Killed process 812 (plc-bridge)")],
         {"mem_avail": 52_000}),
    ],
    "network_loss": [
        ("MqttDisconnected", "critical", "Broker connection lost for pi-line-3",
         "The Ethernet link went down (cable or switch port), so the broker and PLC-side uplink are unreachable.",
         "ip link show eth0; ethtool eth0; reseat the cable or move to a working switch port",
         [("WARN", "kernel", "eth0: Link is Down"),
          ("ERROR", "mqtt", "connect broker.plant.lan:8883: Network is unreachable (os error 101)"),
          ("WARN", "buffer", "upstream offline, buffering locally ({n} samples)")],
         {}),
        ("NetworkUnreachable", "warning", "No telemetry from pi-line-3 for 10 minutes",
         "The DHCP lease expired and was not renewed, leaving eth0 without an address.",
         "dhclient -r eth0 && dhclient eth0 (or systemctl restart networking)",
         [("WARN", "dhcp", "lease on eth0 expired, no DHCPOFFER received"),
          ("ERROR", "mqtt", "connect broker.plant.lan:8883: No route to host (os error 113)"),
          ("ERROR", "ntp", "no server reachable")],
         {}),
        (None, "warning", "pi-line-3 reports errors",
         "The DNS server is unreachable, so the broker hostname does not resolve.",
         "resolvectl status; point /etc/resolv.conf at a reachable resolver or add broker to /etc/hosts",
         [("ERROR", "mqtt", "resolve broker.plant.lan: Temporary failure in name resolution"),
          ("WARN", "net", "ping 10.20.0.1 (gateway) ok, ping 10.20.0.53 (dns) 100% loss"),
          ("WARN", "buffer", "upstream offline, buffering locally ({n} samples)")],
         {}),
    ],
    "service_crash": [
        ("ServiceDown", "critical", "plc-bridge not running on pi-line-3",
         "A panic in the Modbus decoder on a short frame crashes plc-bridge; systemd gave up restarting it.",
         "systemctl reset-failed plc-bridge && systemctl start plc-bridge; roll back to the previous release",
         [("ERROR", "plc-bridge", "thread 'poll' panicked at src/decode.rs:88: index out of bounds: len 3, index 4"),
          ("INFO", "systemd", "plc-bridge.service: Main process exited, code=exited, status=101"),
          ("ERROR", "systemd", "plc-bridge.service: Start request repeated too quickly.")],
         {"cpu": 2.0}),
        ("ServiceRestarting", "critical", "Telemetry from pi-line-3 stopped",
         "After an update, plc-bridge segfaults in the bundled libmodbus on start.",
         "apt-get install --reinstall plc-bridge=2.3.1 (the previous version); systemctl restart plc-bridge",
         [("INFO", "apt", "upgraded plc-bridge 2.3.1 -> 2.4.0"),
          ("ERROR", "kernel", "plc-bridge[1730]: segfault at 0 ip 0000007f8a2c1d44 in libmodbus.so.5"),
          ("INFO", "systemd", "plc-bridge.service: Main process exited, code=killed, status=11/SEGV")],
         {"cpu": 1.5}),
        (None, "warning", "pi-line-3 data gaps every few minutes",
         "The watchdog kills plc-bridge because a deadlock stops its heartbeat; it restarts in a loop.",
         "systemctl kill -s ABRT plc-bridge to get a core, then restart; report the deadlock upstream",
         [("WARN", "health", "heartbeat missed (last 92 s ago)"),
          ("ERROR", "systemd", "plc-bridge.service: Watchdog timeout (limit 60s)!"),
          ("INFO", "systemd", "plc-bridge.service: Scheduled restart job, restart counter is at 14.")],
         {}),
    ],
    "sensor_fault": [
        ("SensorReadErrors", "warning", "Sensor errors on pi-line-3",
         "Temperature sensor temp-2 on plc-2 is disconnected and reads the 0xFFFF open-circuit value.",
         "check the temp-2 wiring at plc-2; mbpoll -a 2 -r 30010 -c 1 -t 3 plc-2 to confirm",
         [("WARN", "poll", "plc-2: temp-2 raw=0xFFFF (6553.5 C) out of range, sample marked bad"),
          ("WARN", "poll", "plc-2: temp-2 raw=0xFFFF (6553.5 C) out of range, sample marked bad"),
          ("INFO", "poll", "plc-2: other 11 channels ok")],
         {}),
        ("SensorValueStuck", "warning", "Line 3 quality data suspicious",
         "Pressure transmitter pt-4 is stuck: the same value for hours while the line runs.",
         "recalibrate or replace pt-4; compare with a handheld gauge",
         [("WARN", "validate", "plc-1: pt-4 unchanged at 4.12 bar for 3h (stuck value)"),
          ("INFO", "poll", "plc-1: flow ft-1 varies 18.2..22.9 l/min"),
          ("WARN", "validate", "plc-1: pt-4 variance 0.000 over 500 samples")],
         {}),
        (None, "warning", "pi-line-3 reports errors",
         "The RS-485 flow meter at slave 7 stopped answering (power or bus fault) while the others answer.",
         "check power and termination of slave 7; mbpoll -a 7 -r 1 -c 2 /dev/ttyUSB0",
         [("ERROR", "rtu", "slave 7: no response (timeout 500 ms), 3 retries"),
          ("ERROR", "rtu", "slave 7: Modbus exception 0x0B gateway target failed to respond"),
          ("INFO", "rtu", "slaves 1-6: ok")],
         {}),
    ],
    "overheating": [
        ("TemperatureHigh", "critical", "SoC temperature high on pi-line-3",
         "The cabinet fan failed, so the SoC overheats and throttles.",
         "vcgencmd get_throttled; replace the cabinet fan; check systemctl status fan-control",
         [("WARN", "fan-control", "fan rpm 0 (expected > 2000)"),
          ("WARN", "kernel", "cpu0: Core temperature above threshold, cpu clock throttled"),
          ("WARN", "poll", "plc-1: poll cycle overran 1000 ms budget")],
         {"temp": 84.5, "cpu": 97.0, "load": 3.9}),
        ("CpuThrottled", "warning", "pi-line-3 polls late",
         "The cabinet air filter is clogged; temperatures climb through the day and the CPU throttles.",
         "clean or replace the cabinet filter; vcgencmd measure_temp to confirm",
         [("WARN", "thermal", "soc 81.2 C, frequency capped to 600 MHz"),
          ("INFO", "fan-control", "fan rpm 4800 (max)"),
          ("WARN", "poll", "plc-2: poll cycle overran 1000 ms budget")],
         {"temp": 82.0, "cpu": 88.0, "load": 3.1}),
        (None, "critical", "pi-line-3 reports errors",
         "The heatsink came loose after maintenance; the SoC reaches the thermal limit under normal load.",
         "reseat the heatsink with thermal pad; vcgencmd get_throttled should read 0x0",
         [("WARN", "kernel", "thermal thermal_zone0: critical temperature reached (85 C)"),
          ("WARN", "kernel", "cpu clock throttled"),
          ("WARN", "health", "heartbeat late by 4 s")],
         {"temp": 85.0, "cpu": 71.0, "load": 2.4}),
    ],
    "certificate_expired": [
        ("TlsHandshakeFailures", "critical", "TLS failures from pi-line-3 to broker",
         "The device's client certificate for the MQTT broker expired.",
         "openssl x509 -enddate -noout -in /etc/plc-bridge/client.crt; systemctl start cert-renew.service",
         [("ERROR", "mqtt", "tls handshake with broker.plant.lan:8883: certificate expired (client.crt notAfter 2026-11-30)"),
          ("INFO", "net", "tcp connect broker.plant.lan:8883 ok in 3 ms"),
          ("WARN", "buffer", "upstream offline, buffering locally ({n} samples)")],
         {}),
        ("TlsHandshakeFailures", "warning", "No telemetry from pi-line-3",
         "The broker's server certificate expired; the bridge rightly refuses it.",
         "openssl s_client -connect broker.plant.lan:8883 </dev/null | openssl x509 -noout -dates; renew it on the broker",
         [("ERROR", "mqtt", "invalid peer certificate: Expired (notAfter 2026-12-01T00:00:00Z)"),
          ("INFO", "dns", "broker.plant.lan -> 10.20.0.8"),
          ("WARN", "mqtt", "reconnect in 30 s (attempt {n})")],
         {}),
        (None, "warning", "pi-line-3 reports errors",
         "The plant CA bundle on the device is out of date and its intermediate CA expired.",
         "update-ca-certificates after copying the new plant CA to /usr/local/share/ca-certificates/",
         [("ERROR", "mqtt", "tls: unable to get local issuer certificate: certificate has expired (plant-intermediate-ca)"),
          ("INFO", "net", "tcp connect broker.plant.lan:8883 ok in 4 ms"),
          ("WARN", "mqtt", "reconnect in 30 s (attempt {n})")],
         {}),
    ],
    "config_error": [
        ("ConfigReloadFailed", "warning", "plc-bridge config reload failed on pi-line-3",
         "A typo in config.toml (unknown key `registr`) made the reload fail, so plc-2 is not polled.",
         "plc-bridge --check-config /etc/plc-bridge/config.toml; fix `registr` to `registers`; systemctl reload plc-bridge",
         [("INFO", "config", "reload requested (SIGHUP)"),
          ("ERROR", "config", "/etc/plc-bridge/config.toml line 14: unknown field `registr`"),
          ("WARN", "config", "keeping previous config; plc-2 has no register map")],
         {}),
        ("ConfigInvalid", "warning", "Line 3 values implausible",
         "The register map was edited with an off-by-one address, so every value is read from the neighbouring register.",
         "git -C /etc/plc-bridge diff config.toml; restore base_address=40001; systemctl restart plc-bridge",
         [("INFO", "config", "loaded /etc/plc-bridge/config.toml (base_address=40002)"),
          ("WARN", "validate", "plc-1: speed reads 0x4120 as 16672 rpm (limit 3000)"),
          ("WARN", "validate", "plc-1: 9 of 12 channels out of configured range")],
         {}),
        (None, "critical", "pi-line-3 reports errors",
         "The broker URL was changed to plain port 1883 while TLS is required, so every connect is refused.",
         "set broker_url = \"mqtts://broker.plant.lan:8883\" in /etc/plc-bridge/config.toml; systemctl restart plc-bridge",
         [("INFO", "config", "broker_url = mqtts://broker.plant.lan:1883"),
          ("ERROR", "mqtt", "tls handshake: received plaintext (wrong port? 1883 is not TLS)"),
          ("WARN", "mqtt", "reconnect in 30 s (attempt {n})")],
         {}),
    ],
}


def fill(rng, msg):
    return msg.format(n=rng.randint(8, 96), ms=rng.randint(4, 60), k=rng.randint(100, 9999))


def metrics(rng, ov, at):
    total_kb, disk_total = 3_884_096, 31_268_536_320
    cpu = ov.get("cpu", round(rng.uniform(8, 30), 1))
    mem = ov.get("mem_avail", rng.randint(1_900_000, 2_600_000))
    disk = ov.get("disk_free", rng.randint(17_000_000_000, 22_000_000_000))
    temp = ov.get("temp", round(rng.uniform(44, 58), 1))
    load1 = ov.get("load", round(rng.uniform(0.2, 0.9), 2))

    def series(end, start, nd=0):
        # six samples, one a minute, ending at the current value; a trend
        # from start when the resource is the cause, else small jitter
        out = []
        for i in range(6):
            v = start + (end - start) * i / 5
            if i < 5 and start == end:
                v *= 1 + rng.uniform(-0.04, 0.04)
            out.append(round(v, nd) if nd else int(v))
        return out
    return {
        "sampled_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_percent": cpu,
        "mem_available_kb": mem,
        "mem_total_kb": total_kb,
        "disk_free_bytes": disk,
        "disk_total_bytes": disk_total,
        "temperature_c": temp,
        "load": [load1, round(load1 * 0.8, 2), round(load1 * 0.6, 2)],
        "series": {
            "interval_s": 60,
            "cpu_percent": series(cpu, cpu if "cpu" not in ov else 20.0, 1),
            "mem_available_kb": series(mem, mem if "mem_avail" not in ov else 1_400_000),
            "disk_free_bytes": series(disk, disk if "disk_free" not in ov else 900_000_000),
            "temperature_c": series(temp, temp if "temp" not in ov else 62.0, 1),
        },
    }


def incident(rng, category, variant, generic, start):
    alert_name, sev, summary, cause, fix, telling, ov = VARIANTS[category][variant]
    if alert_name is None or generic:
        alert_name = rng.choice(GENERIC_ALERTS)
    t = start
    # routine lines first, the telling ones spread over the last two thirds
    n_noise = rng.randint(14, 22)
    lines = [rng.choice(NOISE) for _ in range(n_noise)]
    slots = sorted(rng.sample(range(n_noise // 3, n_noise + len(telling)), len(telling)))
    for s, tl in zip(slots, telling):
        lines.insert(s, tl)
    log = []
    for lvl, comp, msg in lines:
        t += timedelta(seconds=rng.randint(3, 40))
        log.append(f"{t.strftime('%Y-%m-%d %H:%M:%S')} {lvl:<5} {comp}: {fill(rng, msg)}")
    fired = t + timedelta(seconds=rng.randint(5, 60))
    alert = {"alert": alert_name, "device": DEVICE, "severity": sev, "summary": summary,
             "fired_at": fired.strftime("%Y-%m-%dT%H:%M:%SZ")}
    m = metrics(rng, ov, fired)
    return alert, log, m, cause, fix


def dump(obj):
    # one key a line, values (lists, the series object) compact: the
    # readable form that costs the fewest tokens
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/ops"
    rng = random.Random(2026)
    order = [(c, v) for c in CATEGORIES for v in range(3)]
    rng.shuffle(order)
    labels = {"categories": CATEGORIES, "incidents": []}
    start = datetime(2026, 11, 2, 6, 0, tzinfo=timezone.utc)
    for i, (cat, var) in enumerate(order, start=1):
        nid = f"{i:02d}"
        # 12 of 24 generic: every third variant, and the second one in every
        # other category
        generic = var == 2 or (var == 1 and CATEGORIES.index(cat) % 2 == 0)
        t0 = start + timedelta(days=i - 1, minutes=rng.randint(0, 600))
        alert, log, m, cause, fix = incident(rng, cat, var, generic, t0)
        # stay inside the text budget: drop routine lines (never telling ones)
        telling = {ln for ln in log if any(tl[2].split("{")[0][:30] in ln for tl in VARIANTS[cat][var][5])}
        while len(dump(alert)) + sum(len(x) + 1 for x in log) + len(dump(m)) > BUDGET and len(log) > 15:
            for j in range(len(log) - 1, -1, -1):
                if log[j] not in telling:
                    del log[j]
                    break
        size = len(dump(alert)) + sum(len(x) + 1 for x in log) + len(dump(m))
        assert size <= BUDGET and 15 <= len(log) <= 40, (nid, size, len(log))
        d = os.path.join(out, "incidents", nid)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "alert.json"), "w") as f:
            f.write(dump(alert))
        with open(os.path.join(d, "app.log"), "w") as f:
            f.write("\n".join(log) + "\n")
        with open(os.path.join(d, "metrics.json"), "w") as f:
            f.write(dump(m))
        labels["incidents"].append({"id": nid, "category": cat, "root_cause": cause, "fix": fix})
    with open(os.path.join(out, "labels.json"), "w") as f:
        f.write(json.dumps(labels, indent=1) + "\n")
    counts = {c: sum(1 for x in labels["incidents"] if x["category"] == c) for c in CATEGORIES}
    print(f"{len(order)} incidents in {out}/incidents; {counts}")


if __name__ == "__main__":
    main()
