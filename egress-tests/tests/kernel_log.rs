//! Real-kernel tests of the kernel's debug log (`--kernel-log`): a datapath loaded with it writes
//! one line per decision that reaches `tracing` under `egress_ebpf`; one loaded without it
//! writes nothing into its ring. And what the logging costs `connect4`, off and on (printed).

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use egress::{
    datapath::{Capacities, Datapath},
    policy::{Policy, compile::CompiledPolicy},
};
use egress_tests::{Probe, TestCgroup, Verdict::Denied, probe};

const POLICY: &str = r#"
mode = "enforce"
default = "deny"
allow_loopback = false

[[service]]
name = "web"
destinations = ["127.0.0.2"]
ports = [80]
protocols = ["tcp"]

[[block]]
name = "no-127-5"
destinations = ["127.0.0.5/32"]
"#;

fn compile() -> CompiledPolicy {
    let p = Policy::parse("test.toml", POLICY).unwrap_or_else(|e| panic!("{e}"));
    CompiledPolicy::compile(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn load(c: &CompiledPolicy, kernel_log: bool) -> Datapath {
    let sizes = Capacities {
        kernel_log,
        ..Capacities::default()
    };
    Datapath::load_capacities(c, sizes)
        .unwrap_or_else(|e| panic!("loading the datapath must work as root: {e}"))
}

fn rule_id(c: &CompiledPolicy, name: &str) -> u32 {
    (0..1000)
        .find(|&id| c.rule_name(id) == name)
        .unwrap_or_else(|| panic!("no rule {name}"))
}

/// What a `tracing` subscriber writes, kept.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// aya-log records read straight from a program's ring (not through egress).
#[derive(Clone, Default)]
struct Records(Arc<Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }

    fn flush(&self) {}
}

#[test]
fn a_denied_connect_is_logged_with_its_rule_and_address_only_when_asked() {
    let c = compile();
    let block = rule_id(&c, "no-127-5");

    let on_cg = TestCgroup::new();
    let mut on = load(&c, true);
    let mut log = on
        .take_kernel_log()
        .expect("loaded with kernel_log: the ring's reader");
    assert!(on.take_kernel_log().is_none(), "taken once");
    on.attach(on_cg.path()).expect("attach");
    assert_eq!(
        probe(
            &on_cg,
            &[("udp-connect", "127.0.0.5:53"), ("udp-connect", "[::1]:53")]
        ),
        [Denied, Denied]
    );
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || log.flush());
    let text = out.text();
    let line = text
        .lines()
        .find(|l| l.contains("dst=127.0.0.5"))
        .unwrap_or_else(|| panic!("a line for the denied connect in:\n{text}"));
    eprintln!("{line}");
    for part in [
        "DEBUG",
        "egress_ebpf",
        "connect4 deny",
        &format!("rule={block} "),
        "port=53",
        "proto=17",
        "tgid=",
    ] {
        assert!(line.contains(part), "{part:?} in {line:?}");
    }
    // IPv6 (the default verdict: no rule matched).
    let line = text
        .lines()
        .find(|l| l.contains("dst=::1 "))
        .unwrap_or_else(|| panic!("a line for the IPv6 connect in:\n{text}"));
    eprintln!("{line}");
    assert!(line.contains("connect6 deny rule=0 "), "{line}");
    assert_eq!(text.lines().count(), 2, "one line per decision:\n{text}");

    // Loaded without it: the program's own ring stays empty.
    let off_cg = TestCgroup::new();
    let mut off = load(&c, false);
    assert!(off.take_kernel_log().is_none());
    off.attach(off_cg.path()).expect("attach");
    let records = Records::default();
    let mut reader = aya_log::EbpfLogger::init_from_id_with_logger(
        off.program_id("connect4").unwrap(),
        records.clone(),
    )
    .expect("the ring of the loaded connect4");
    assert_eq!(probe(&off_cg, &[("udp-connect", "127.0.0.5:53")]), [Denied]);
    reader.flush();
    assert_eq!(*records.0.lock().unwrap(), Vec::<String>::new());

    // The same reader on the logging datapath's ring does see its lines (the check above can fail).
    let records = Records::default();
    let mut reader = aya_log::EbpfLogger::init_from_id_with_logger(
        on.program_id("connect4").unwrap(),
        records.clone(),
    )
    .expect("the ring of the loaded connect4");
    assert_eq!(probe(&on_cg, &[("udp-connect", "127.0.0.5:53")]), [Denied]);
    reader.flush();
    assert_eq!(
        records.0.lock().unwrap().len(),
        1,
        "{records:?}",
        records = records.0
    );
}

/// `connect4`'s mean run time per call with the logging compiled in but off, and on (its lines
/// read after each round), alternating. Printed for docs/BENCHMARKS.md; asserted only loosely
/// (timings on a shared machine are noisy).
#[test]
fn the_cost_of_kernel_logging_in_connect4() {
    const ROUNDS: usize = 8;
    // Under the 128 KiB ring (a line takes 256 bytes of it): every record of a round is kept.
    const CALLS: u64 = 400;
    let c = compile();
    let off_cg = TestCgroup::new();
    let mut off = load(&c, false);
    off.attach(off_cg.path()).expect("attach");
    let on_cg = TestCgroup::new();
    let mut on = load(&c, true);
    let mut log = on.take_kernel_log().unwrap();
    on.attach(on_cg.path()).expect("attach");
    let _stats = egress::datapath::enable_run_stats().expect("BPF_ENABLE_STATS");
    let mut per_call = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, (dp, cg)) in [(&off, &off_cg), (&on, &on_cg)].into_iter().enumerate() {
            let before = dp.run_stats("connect4").unwrap();
            let lines = Probe::new()
                .cgroup(cg)
                .opt("--count", CALLS.to_string())
                .call("udp-connect", "127.0.0.5:53")
                .lines();
            assert_eq!(lines[0].summary().times(&Denied), CALLS);
            let after = dp.run_stats("connect4").unwrap();
            let runs = after.run_count - before.run_count;
            assert!(runs >= CALLS, "{runs} runs of connect4");
            per_call[i].push((after.run_time - before.run_time).as_nanos() as f64 / runs as f64);
        }
        // No subscriber in this test: the lines are read, and dropped.
        log.flush();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [mut off_ns, mut on_ns] = per_call;
    let (off_m, on_m) = (median(&mut off_ns), median(&mut on_ns));
    eprintln!(
        "connect4 ns/run over {ROUNDS} rounds of {CALLS} denied UDP connects: \
         logging off {off_m:.0} (rounds {off_ns:.0?}), on {on_m:.0} (rounds {on_ns:.0?})"
    );
    assert!(off_m > 0.0 && on_m > 0.0);
    // The logging code is a global BPF function, verified once on its own: with it on, the
    // hooks stay under the kernel's 1M-instruction limit with room (6.18: connect6 383k;
    // Debian's 6.1, whose verifier prunes far less: 695k).
    for name in &egress::datapath::HOOKS[..4] {
        let [off_n, on_n] = [&off, &on].map(|dp| dp.run_stats(name).unwrap().verified_insns);
        eprintln!("{name}: verified instructions with logging off {off_n}, on {on_n}");
        assert!(
            on_n < 900_000,
            "{name}: {on_n} instructions verified with logging on"
        );
    }
}
