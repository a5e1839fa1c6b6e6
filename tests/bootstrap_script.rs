//! Tier 1: the pod's bootstrap.sh (from the built ConfigMap) run with stand-ins for RabbitMQ's
//! programs, for what a real node cannot be made to do on demand: abort its boot (RabbitMQ 4.0 on
//! Mnesia does so at random when every node of a cluster boots at once), keep aborting, crash
//! after it booted, or fail its first start after join_cluster (RabbitMQ 3.10 on Mnesia, when two
//! nodes join at once on a loaded machine). The real nodes run the same script in tier 2.

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
    /// A first boot (no marker): the node joins node 0, and the first `rabbitmqctl start_app`
    /// after join_cluster fails (as RabbitMQ 3.10 fails it with its VM left unable to start
    /// again). Then the script's new Erlang VM does what `NewVm` says.
    JoinsStartAppFails(NewVm),
    /// Boots with a child process (its Erlang VM), and ignores SIGTERM: a stop that never ends.
    HangsOnStop,
}

#[derive(Clone, Copy)]
enum NewVm {
    /// Boots as the member join_cluster made it.
    BootsAsMember,
    /// Boots as a node of its own (its data did not survive); node 0 still lists it.
    BootsAlone,
    /// Every new VM aborts its boot (exit 3).
    NeverBoots,
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
        let first_boot = matches!(server, Server::JoinsStartAppFails(_));
        if !first_boot {
            std::fs::write(dir.join("mnesia").join(NODE).join("warren-clustered"), "").expect("marker");
        }

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
            Server::JoinsStartAppFails(NewVm::BootsAsMember) => run_until_term.to_string(),
            Server::JoinsStartAppFails(NewVm::BootsAlone) => {
                format!("if [ \"$n\" -gt 1 ]; then rm -f \"$STATE/joined\"; fi; {run_until_term}")
            }
            Server::JoinsStartAppFails(NewVm::NeverBoots) => {
                format!("if [ \"$n\" -gt 1 ]; then sleep 0.3; exit 3; fi; {run_until_term}")
            }
            Server::HangsOnStop => "touch \"$STATE/running\"; trap '' TERM; sleep 1000 & echo $! > \"$STATE/vm\"; \
                                    while :; do sleep 0.1; done"
                .to_string(),
        };
        // cluster_status (`-q -n <node> cluster_status`): node 0 is a cluster of its own; this node
        // lists node 0 once it has joined.
        let peer = NODE.replace("demo-1.", "demo-0.");
        let cluster_status = format!(
            "if [ \"$3\" = '{NODE}' ] && [ ! -f \"$STATE/joined\" ]; then echo '{{\"disk_nodes\":[\"{NODE}\"]}}'; \
             elif [ \"$3\" = '{NODE}' ]; then echo '{{\"disk_nodes\":[\"{peer}\",\"{NODE}\"]}}'; \
             else echo '{{\"disk_nodes\":[\"{peer}\"]}}'; fi"
        );
        let start_app = "n=$(( $(cat \"$STATE/start_app\" 2>/dev/null || echo 0) + 1 )); echo $n > \"$STATE/start_app\"; \
                         if [ $n = 1 ]; then \
                         echo 'Error: {:rabbit, {{:cannot_create_schema, {:has_no_disc, :\"rabbit@demo-1\"}}}}' >&2; \
                         exit 70; fi";
        let programs = [
            (
                "rabbitmq-server",
                format!(
                    "n=$(( $(cat \"$STATE/starts\" 2>/dev/null || echo 0) + 1 )); echo $n > \"$STATE/starts\"\n{behaviour}"
                ),
            ),
            // await_startup answers whether the server runs; `eval` (the maintenance-mode check) says
            // no; the clustering commands are recorded in order.
            (
                "rabbitmqctl",
                format!(
                    "case \" $* \" in *' await_startup '*) [ -f \"$STATE/running\" ];; *' eval '*) echo false;; \
                     *' cluster_status '*) {cluster_status};; \
                     *' join_cluster '*) echo join_cluster >> \"$STATE/calls\"; touch \"$STATE/joined\";; \
                     *' start_app '*) echo start_app >> \"$STATE/calls\"; {start_app};; \
                     *) echo \"$2\" >> \"$STATE/calls\";; esac"
                ),
            ),
            // check_running: every node runs. grow: the first one succeeds but a queue refuses the
            // member (another node joins at the same moment), the next one grows it.
            ("rabbitmq-diagnostics", "exit 0".to_string()),
            (
                "rabbitmq-queues",
                "n=$(( $(cat \"$STATE/grows\" 2>/dev/null || echo 0) + 1 )); echo $n > \"$STATE/grows\"; \
                 if [ $n = 1 ]; then echo '[{\"name\":\"celery\",\"result\":\"cluster_change_not_permitted\"}]'; \
                 else echo '[]'; fi"
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
            .env("WARREN_STOP_TIMEOUT", "2")
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

    /// The clustering commands the script ran, one per line, in order.
    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/calls")).unwrap_or_default()
    }

    /// Waits for a first boot's last word: the script marks the node, flags the boot, then says so.
    fn wait_clustered(&self) {
        self.wait_until("clustered and said so", Duration::from_secs(60), || {
            self.booted_flag().exists() && self.console().contains("is clustered")
        });
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

#[test]
fn a_joining_node_whose_first_start_fails_boots_in_a_new_vm_and_is_marked_clustered() {
    let mut pod = Pod::start("join-start-fails", Server::JoinsStartAppFails(NewVm::BootsAsMember));
    pod.wait_clustered();
    let calls = pod.calls();
    // start_app once: its VM cannot start the app again; the second start is a new VM's boot.
    assert_eq!(calls.lines().collect::<Vec<_>>(), ["stop_app", "reset", "join_cluster", "start_app"]);
    assert_eq!(pod.starts(), 2, "the first VM stopped, a second one booted: {}", pod.console());
    let console = pod.console();
    assert!(console.contains("joining the cluster of rabbit@demo-0.demo-nodes"), "{console}");
    assert!(
        console.contains(
            "failed to start after joining rabbit@demo-0.demo-nodes.default.svc.cluster.local (try 1); starting it \
             again in a new Erlang VM"
        ),
        "{console}"
    );
    assert!(console.contains("booted in its new Erlang VM as a member of the cluster it joined"), "{console}");
    assert!(console.contains("is clustered"), "{console}");
    assert!(pod.dir.join("mnesia").join(NODE).join("warren-clustered").exists(), "{console}");
    let grows = std::fs::read_to_string(pod.dir.join("state/grows")).unwrap_or_default();
    assert_eq!(grows.trim(), "2", "grown again after a queue refused the member: {console}");
    assert!(!console.contains("growing quorum queues"), "{console}");
    // The pod's main process follows the new VM: SIGTERM stops it, and the script exits with it.
    pod.terminate();
    assert!(pod.wait_exit(Duration::from_secs(15)).success(), "{}", pod.console());
    assert!(!pod.dir.join("state/running").exists(), "the new VM got the SIGTERM");
    assert_eq!(pod.starts(), 2, "{}", pod.console());
}

#[test]
fn a_joining_node_whose_new_vm_boots_alone_joins_again() {
    let mut pod = Pod::start("join-boots-alone", Server::JoinsStartAppFails(NewVm::BootsAlone));
    pod.wait_clustered();
    let calls = pod.calls();
    let join = ["stop_app", "reset", "join_cluster", "start_app"];
    assert_eq!(calls.lines().collect::<Vec<_>>(), [join, join].concat(), "{}", pod.console());
    assert_eq!(pod.starts(), 2, "{}", pod.console());
    let console = pod.console();
    assert!(console.contains("(try 1); starting it again in a new Erlang VM"), "{console}");
    assert!(!console.contains("as a member of the cluster it joined"), "{console}");
    assert_eq!(console.matches("joining the cluster of rabbit@demo-0").count(), 2, "{console}");
    assert!(pod.dir.join("mnesia").join(NODE).join("warren-clustered").exists(), "{console}");
    pod.terminate();
    assert!(pod.wait_exit(Duration::from_secs(15)).success(), "{}", pod.console());
}

#[test]
fn a_joining_node_that_never_starts_exits_unmarked_for_the_kubelet_to_restart() {
    let mut pod = Pod::start("join-never-starts", Server::JoinsStartAppFails(NewVm::NeverBoots));
    let status = pod.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", pod.console());
    let calls = pod.calls();
    assert_eq!(calls.matches("start_app").count(), 1, "{calls}");
    assert_eq!(pod.starts(), 3, "start_app, then two new VMs: {}", pod.console());
    assert!(
        pod.console()
            .contains("failed to start after joining rabbit@demo-0.demo-nodes.default.svc.cluster.local, 3 times"),
        "{}",
        pod.console()
    );
    assert!(pod.console().contains("RabbitMQ exited while booting in its new Erlang VM"), "{}", pod.console());
    // Unmarked: the restarted container joins from the start again.
    assert!(!pod.dir.join("mnesia").join(NODE).join("warren-clustered").exists());
    assert!(!pod.booted_flag().exists());
}

#[test]
fn a_member_that_does_not_stop_after_sigterm_is_killed_with_its_vm() {
    let mut pod = Pod::start("hangs-on-stop", Server::HangsOnStop);
    pod.wait_until("booted", Duration::from_secs(30), || pod.booted_flag().exists());
    let vm = std::fs::read_to_string(pod.dir.join("state/vm")).expect("the VM's pid");
    let vm = PathBuf::from(format!("/proc/{}", vm.trim()));
    assert!(vm.exists(), "the VM stand-in runs");
    pod.terminate();
    let status = pod.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(137), "the server's status once killed: {}", pod.console());
    assert!(pod.console().contains("RabbitMQ has not stopped 2s after SIGTERM: killing it"), "{}", pod.console());
    assert_eq!(pod.starts(), 1, "a killed server is not started again: {}", pod.console());
    pod.wait_until("the VM gone with it", Duration::from_secs(10), || !vm.exists());
}
