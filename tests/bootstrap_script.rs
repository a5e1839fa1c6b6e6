//! Tier 1: the pod's bootstrap.sh (from the built ConfigMap) run with stand-ins for RabbitMQ's
//! programs, for what a real node cannot be made to do on demand: abort its boot (RabbitMQ 4.0 on
//! Mnesia does so at random when every node of a cluster boots at once), keep aborting, or crash
//! after it booted. The real nodes run the same script in tier 2.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use warren::controller::build;

const NODE: &str = "rabbit@demo-1.demo-nodes.default.svc.cluster.local";

/// How the stand-in `rabbitmq-server` behaves on each start.
#[derive(Clone, Copy)]
enum Server {
    /// Its first start aborts (exit 3); later starts boot and run until SIGTERM.
    FailsFirstBoot,
    /// Every start aborts (exit 3).
    NeverBoots,
    /// Boots, and exits with status 4 once the script has seen it booted.
    CrashesAfterBoot,
}

/// A pod of one: a directory with the script, its config, its data directory (holding the
/// "clustered" marker: a node that has joined before) and the stand-in programs.
struct Pod {
    dir: PathBuf,
    child: Option<Child>,
}

impl Pod {
    fn start(name: &str, server: Server) -> Pod {
        let dir = std::env::temp_dir().join(format!("warren-bootstrap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["bin", "config", "home", "state", "mnesia"] {
            std::fs::create_dir_all(dir.join(sub)).expect("pod dirs");
        }
        let validated = warren::controller::validate::validate(
            &testkit::fixture("basic.yaml"),
            &warren::controller::validate::Settings::default(),
        )
        .expect("valid fixture");
        let credentials =
            build::Credentials { erlang_cookie: "COOKIE".into(), username: "u".into(), password: "p".into() };
        let data = build::build(&validated, &credentials).config_map.data.expect("ConfigMap data");
        for (key, text) in &data {
            std::fs::write(dir.join("config").join(key), text).expect("config file");
        }
        std::fs::write(dir.join("cookie"), "COOKIE").expect("cookie");
        std::fs::create_dir_all(dir.join("mnesia").join(NODE)).expect("node data dir");
        std::fs::write(dir.join("mnesia").join(NODE).join("warren-clustered"), "").expect("marker");

        let state = dir.join("state");
        let booted_flag = dir.join("mnesia").join(format!("{NODE}-warren-booted"));
        let run_until_term = "touch \"$STATE/running\"; trap 'rm -f \"$STATE/running\"; exit 0' TERM; \
                              while :; do sleep 0.1; done";
        let behaviour = match server {
            Server::FailsFirstBoot => format!("if [ \"$n\" = 1 ]; then sleep 0.3; exit 3; fi; {run_until_term}"),
            Server::NeverBoots => "sleep 0.3; exit 3".to_string(),
            Server::CrashesAfterBoot => format!(
                "touch \"$STATE/running\"; until [ -f '{}' ]; do sleep 0.1; done; rm -f \"$STATE/running\"; exit 4",
                booted_flag.display()
            ),
        };
        let programs = [
            (
                "rabbitmq-server",
                format!(
                    "n=$(( $(cat \"$STATE/starts\" 2>/dev/null || echo 0) + 1 )); echo $n > \"$STATE/starts\"\n{behaviour}"
                ),
            ),
            // await_startup answers whether the server runs; `eval` (the maintenance-mode check) says no.
            (
                "rabbitmqctl",
                "case \" $* \" in *' await_startup '*) [ -f \"$STATE/running\" ];; *' eval '*) echo false;; esac"
                    .to_string(),
            ),
        ];
        for (name, body) in programs {
            let path = dir.join("bin").join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).expect("stand-in");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
        let log = std::fs::File::create(dir.join("console.log")).expect("console log");
        let child = Command::new("/bin/bash")
            .arg(dir.join("config/bootstrap.sh"))
            .env_clear()
            .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.join("bin").display()))
            .env("HOME", dir.join("home"))
            .env("STATE", &state)
            .env("RABBITMQ_NODENAME", NODE)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("WARREN_STS_NAME", "demo")
            .env("WARREN_PEER_DOMAIN", "demo-nodes.default.svc.cluster.local")
            .env("WARREN_CONFIG_DIR", dir.join("config"))
            .env("WARREN_COOKIE_FILE", dir.join("cookie"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group: the script's background watcher goes with it at the end.
            .process_group(0)
            .spawn()
            .expect("bash bootstrap.sh");
        Pod { dir, child: Some(child) }
    }

    fn starts(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("state/starts")).map(|s| s.trim().parse().unwrap()).unwrap_or(0)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    fn booted_flag(&self) -> PathBuf {
        self.dir.join("mnesia").join(format!("{NODE}-warren-booted"))
    }

    /// Waits for the script to exit, up to `limit`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "bootstrap.sh still runs after {limit:?}; console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_until(&self, what: &str, limit: Duration, done: impl Fn() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}; console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM to the script, as the kubelet sends the container's main process.
    fn terminate(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The whole process group this test started (the script, its watcher, the stand-ins).
            let _ =
                Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).stderr(Stdio::null()).status();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_member_whose_boot_aborts_is_started_again_in_its_container_and_stops_on_sigterm() {
    let mut pod = Pod::start("aborts-once", Server::FailsFirstBoot);
    pod.wait_until("booted on the second start", Duration::from_secs(30), || pod.booted_flag().exists());
    assert_eq!(pod.starts(), 2, "console:\n{}", pod.console());
    assert!(
        pod.console()
            .contains("RabbitMQ exited (status 3) before it finished booting; starting it again (boot 2 of 3)"),
        "{}",
        pod.console()
    );
    pod.terminate();
    let status = pod.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "the server stopped on SIGTERM and the script exits with it: {status}");
    assert_eq!(pod.starts(), 2, "a server stopped by SIGTERM is not started again");
    assert!(!pod.dir.join("state/running").exists(), "the server got the SIGTERM");
}

#[test]
fn a_member_that_never_boots_exits_after_three_starts_for_the_kubelet_to_restart() {
    let mut pod = Pod::start("never-boots", Server::NeverBoots);
    let status = pod.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(3), "the server's own status: {}", pod.console());
    assert_eq!(pod.starts(), 3, "{}", pod.console());
    assert!(pod.console().contains("(boot 3 of 3)"), "{}", pod.console());
    assert!(!pod.booted_flag().exists());
}

#[test]
fn a_member_that_crashes_after_it_booted_is_left_to_the_kubelet() {
    let mut pod = Pod::start("crashes-later", Server::CrashesAfterBoot);
    let status = pod.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(4), "the server's own status: {}", pod.console());
    assert_eq!(pod.starts(), 1, "a crash after the boot is not retried in the container: {}", pod.console());
    assert!(!pod.console().contains("starting it again"), "{}", pod.console());
}
