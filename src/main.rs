//! Wiring only: the command line, telemetry, then `run`, `crd` or `render`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use warren::controller::{self, Context, namespaces::WatchScope, validate::Settings};
use warren::leader::{self, Election};
use warren::server::{self, Metrics, Phase, Readiness};

#[derive(Parser)]
#[command(name = "warren", version, about = "Kubernetes operator for highly available RabbitMQ clusters")]
struct Cli {
    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the controller.
    Run(Box<RunArgs>),
    /// Drains an old RabbitMQ cluster into a new one: definitions, then every message.
    Migrate(Box<MigrateArgs>),
    /// A RabbitCluster on one screen: nodes and their versions, alarms, partitions, queues and
    /// messages, the last Events.
    Status(PluginArgs),
    /// How to connect as a RabbitCluster's default user: user, password, AMQP and failover URIs.
    Secrets(PluginArgs),
    /// Stops the operator from changing a RabbitCluster (annotation warren.dev/paused).
    Pause(PluginArgs),
    /// Lets the operator reconcile a paused RabbitCluster again.
    Resume(PluginArgs),
    /// Prints the CustomResourceDefinitions as YAML.
    Crd,
    /// Prints, as YAML, every object the operator would create for the RabbitCluster in FILE.
    Render {
        file: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// The operator's namespace, which the NetworkPolicy lets reach the management API.
        #[arg(long, default_value = "warren-system")]
        operator_namespace: String,
    },
}

/// `warren run`: the operator.
#[derive(clap::Args)]
struct RunArgs {
    /// Run RabbitClusters and RabbitMigrations in these namespaces only (comma-separated or the
    /// flag repeated; the operator needs a Role in each). Omitted: every namespace (a ClusterRole).
    #[arg(long, env = "WARREN_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// The namespace this operator runs in (its pod's): each cluster's NetworkPolicy lets it reach
    /// the management API. Omitted (run outside the cluster): the management API is not fenced.
    #[arg(long, env = "WARREN_OPERATOR_NAMESPACE")]
    operator_namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "WARREN_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The Kubernetes cluster's DNS domain.
    #[arg(long, env = "WARREN_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Image of migration Jobs whose RabbitMigration names none.
    #[arg(long, env = "WARREN_IMAGE", default_value = warren::controller::migration::DEFAULT_IMAGE)]
    migration_image: String,
    /// Let a RabbitMigration run its Job with another image (`spec.image`); off, a Job runs
    /// the operator's own image only (the Job holds both clusters' credentials).
    #[arg(long, env = "WARREN_ALLOW_MIGRATION_IMAGE")]
    allow_migration_image: bool,
    /// Management API URL of a cluster; `{service}`, `{namespace}` and `{domain}` are filled in.
    #[arg(long, env = "WARREN_MANAGEMENT_URL", default_value = "http://{service}.{namespace}.svc.{domain}:15672")]
    management_url_template: String,
    /// The same for a cluster with `spec.tls`: HTTPS, the certificate verified against the
    /// `ca.crt` of its Secret.
    #[arg(long, env = "WARREN_MANAGEMENT_TLS_URL", default_value = warren::controller::DEFAULT_MANAGEMENT_TLS_URL)]
    management_tls_url_template: String,
    /// Namespace of the Lease the operator's replicas elect a leader with; without it this
    /// process reconciles at once (run one replica only).
    #[arg(long, env = "WARREN_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of that Lease.
    #[arg(long, env = "WARREN_LEASE_NAME", default_value = "warren")]
    lease_name: String,
    /// This replica's name in the Lease (the pod's name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

impl RunArgs {
    fn config(&self) -> warren::controller::Config {
        warren::controller::Config {
            settings: Settings {
                cluster_domain: self.cluster_domain.clone(),
                operator_namespace: self.operator_namespace.clone().filter(|ns| !ns.is_empty()),
            },
            management_url_template: self.management_url_template.clone(),
            management_tls_url_template: self.management_tls_url_template.clone(),
            migration_image: self.migration_image.clone(),
            allow_migration_image: self.allow_migration_image,
        }
    }
}

/// A RabbitCluster, as `kubectl warren` commands name it.
#[derive(clap::Args)]
struct PluginArgs {
    /// The RabbitCluster.
    name: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = warren::kubectl::Output::Text)]
    output: warren::kubectl::Output,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// amqp[s]://USER:PASS@HOST:PORT of the old cluster (prefer the environment variable).
    #[arg(long, env = "WARREN_SOURCE_URI", hide_env_values = true)]
    source: String,
    /// User on the old cluster, replacing the URI's (the Job takes it from a Secret).
    #[arg(long, env = "WARREN_SOURCE_USERNAME", hide_env_values = true)]
    source_username: Option<String>,
    #[arg(long, env = "WARREN_SOURCE_PASSWORD", hide_env_values = true)]
    source_password: Option<String>,
    /// http[s]://HOST:PORT of the old cluster's management API.
    #[arg(long, env = "WARREN_SOURCE_API")]
    source_api: String,
    /// PEM file of the CA that signed the old cluster's certificates (amqps/https), besides the
    /// system's roots. A peer that cannot be verified is refused.
    #[arg(long, env = "WARREN_SOURCE_CA")]
    source_ca: Option<std::path::PathBuf>,
    /// amqp[s]://USER:PASS@HOST:PORT of the new cluster (prefer the environment variable).
    #[arg(long, env = "WARREN_TARGET_URI", hide_env_values = true)]
    target: String,
    /// User on the new cluster, replacing the URI's.
    #[arg(long, env = "WARREN_TARGET_USERNAME", hide_env_values = true)]
    target_username: Option<String>,
    #[arg(long, env = "WARREN_TARGET_PASSWORD", hide_env_values = true)]
    target_password: Option<String>,
    /// http[s]://HOST:PORT of the new cluster's management API.
    #[arg(long, env = "WARREN_TARGET_API")]
    target_api: String,
    /// PEM file of the CA that signed the new cluster's certificates (amqps/https).
    #[arg(long, env = "WARREN_TARGET_CA")]
    target_ca: Option<std::path::PathBuf>,
    /// Only this vhost (repeatable; all vhosts when omitted).
    #[arg(long = "vhost")]
    vhosts: Vec<String>,
    /// Only queues whose names match this regular expression.
    #[arg(long)]
    queues: Option<String>,
    /// Declare durable classic queues as quorum queues on the target (a RabbitMQ 4.x target, which
    /// has no classic mirroring, gets them as quorum queues anyway, unless --keep-classic).
    #[arg(long, conflicts_with = "keep_classic")]
    convert_to_quorum: bool,
    /// On a RabbitMQ 4.x target, keep classic queues classic: they are then not replicated, and
    /// each is named in a warning.
    #[arg(long)]
    keep_classic: bool,
    /// Keep draining messages that still arrive until the source was empty for --idle-timeout.
    #[arg(long)]
    follow: bool,
    #[arg(long, default_value = "30s", value_parser = warren::migrate::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Wait up to this long for consumers to release messages they hold unacknowledged.
    #[arg(long, value_parser = warren::migrate::parse_duration, conflicts_with = "force")]
    wait_for_consumers: Option<std::time::Duration>,
    /// Move what can be moved although consumers hold messages unacknowledged.
    #[arg(long)]
    force: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Unconfirmed messages in flight per queue.
    #[arg(long, default_value_t = 2000)]
    window: u16,
    /// Queues moved at the same time.
    #[arg(long, default_value_t = 8)]
    parallel_queues: usize,
    /// Bytes of messages in flight, shared by the queues moving at once (64Mi, 1Gi, ...); a larger
    /// message still moves, alone. Default: an eighth of the memory limit of this process's cgroup
    /// (a Job's memory limit), else 128Mi.
    #[arg(long, value_parser = warren::migrate::budget::parse_size)]
    max_in_flight: Option<u64>,
    /// Also write a summary (totals, per-queue counts, the error) here, within 4 KiB: the
    /// migration Job points it at its container's termination message for the operator to read.
    #[arg(long, env = "WARREN_TERMINATION_LOG")]
    termination_log: Option<std::path::PathBuf>,
}

/// glibc serves large allocations from its heaps once a freed one has raised its mmap threshold
/// (up to 32 MiB), and keeps what they free: moving 16 MiB messages, the migrator held on to
/// buffers it had freed, up to its memory limit. A fixed threshold gives every large message's
/// buffers back to the system when they are freed. (musl, the image's libc, always does.)
fn give_back_large_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes one malloc parameter under malloc's own lock; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

async fn migrate(args: MigrateArgs) -> std::process::ExitCode {
    give_back_large_buffers();
    use warren::migrate::{Endpoint, Options, migrate};
    let bars = progress_bars(&args);
    let source = Endpoint::with_credentials(&args.source, &args.source_api, args.source_username, args.source_password)
        .and_then(|source| source.with_ca_file(args.source_ca.as_deref()));
    let endpoints = source.and_then(|source| {
        let target =
            Endpoint::with_credentials(&args.target, &args.target_api, args.target_username, args.target_password)
                .and_then(|target| target.with_ca_file(args.target_ca.as_deref()));
        Ok((source, target?))
    });
    let (source, target) = match endpoints {
        Ok(pair) => pair,
        Err(error) => {
            eprintln!("warren migrate: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let queues = match args.queues.as_deref().map(regex::Regex::new).transpose() {
        Ok(queues) => queues,
        Err(error) => {
            eprintln!("warren migrate: --queues: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let options = Options {
        vhosts: args.vhosts,
        queues,
        convert_to_quorum: args.convert_to_quorum,
        keep_classic: args.keep_classic,
        follow: args.follow,
        idle_timeout: args.idle_timeout,
        wait_for_consumers: args.wait_for_consumers,
        force: args.force,
        dry_run: args.dry_run,
        window: args.window.max(1),
        parallel_queues: args.parallel_queues.max(1),
        progress: bars,
        ..Options::new(source, target)
    };
    let options = Options { max_in_flight_bytes: args.max_in_flight.unwrap_or(options.max_in_flight_bytes), ..options };
    let outcome = migrate(&options).await;
    if let Some(path) = &args.termination_log {
        let summary = match &outcome {
            Ok(report) => warren::migrate::report::Summary::of_report(report),
            Err(error) => warren::migrate::report::Summary::of_error(error),
        };
        if let Err(error) = std::fs::write(path, summary.to_termination_message()) {
            eprintln!("warren migrate: writing {}: {error}", path.display());
        }
    }
    match outcome {
        Ok(report) => {
            for line in report.plan_lines() {
                eprintln!("{line}");
            }
            let json = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Some(path) = &args.report
                && let Err(error) = std::fs::write(path, &json)
            {
                eprintln!("warren migrate: writing {}: {error}", path.display());
                return std::process::ExitCode::FAILURE;
            }
            println!("{json}");
            if report.complete || report.dry_run {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("warren migrate: not complete: see the report's queues");
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            tracing::error!(phase = %error.phase, reason = %error.reason, "{}", error.message);
            eprintln!("warren migrate: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A name for the Lease when the pod's is not given: the host's, made unique.
fn fallback_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Bars when a person watches: stderr is a terminal, and the output is not for a machine.
fn progress_bars(args: &MigrateArgs) -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && !args.dry_run
}

fn init_tracing(format: LogFormat, bars: bool) {
    // lapin logs, at error level, channel closes the migrator makes itself; it reports every real
    // failure on its own. Under progress bars, the per-queue info lines would only scroll them away.
    let default = if bars { "warn,lapin=off" } else { "info,kube=warn,lapin=off" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `-o json`: one document, for scripts.
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// The plugin commands, each on a [`PluginArgs`].
#[derive(Clone, Copy)]
enum Plugin {
    Status,
    Secrets,
    Pause,
    Resume,
}

/// `kubectl warren ...`, `warren status ...`: the plugin commands.
async fn plugin(command: Plugin, args: PluginArgs) -> std::process::ExitCode {
    use warren::kubectl::{self, Output, PluginError};
    let outcome: Result<String, PluginError> = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| PluginError(format!("no Kubernetes client configuration (KUBECONFIG): {e}")))?;
        let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
        match command {
            Plugin::Status => {
                let status = kubectl::status::status(&client, &namespace, &args.name).await?;
                Ok(match args.output {
                    Output::Text => kubectl::status::render(&status, jiff::Timestamp::now()),
                    Output::Json => json(&status),
                })
            }
            Plugin::Secrets => {
                let connection = kubectl::connection(&client, &namespace, &args.name).await?;
                Ok(match args.output {
                    Output::Text => kubectl::render_connection(&connection),
                    Output::Json => json(&connection),
                })
            }
            Plugin::Pause | Plugin::Resume => {
                let paused = matches!(command, Plugin::Pause);
                let message = kubectl::set_paused(&client, &namespace, &args.name, paused).await?;
                Ok(match args.output {
                    Output::Text => format!("{message}\n"),
                    Output::Json => json(&serde_json::json!({
                        "namespace": namespace, "name": args.name, "paused": paused, "message": message,
                    })),
                })
            }
        }
    }
    .await;
    match outcome {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kubectl warren: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The command line, named `kubectl warren` when kubectl runs this binary as its plugin.
fn parse_command_line() -> Cli {
    let invoked = std::env::args_os().next().map(std::path::PathBuf::from);
    let as_plugin = invoked
        .as_ref()
        .and_then(|path| path.file_name())
        .is_some_and(|name| name.to_string_lossy().starts_with("kubectl-warren"));
    let mut command = Cli::command();
    if as_plugin {
        command = command.bin_name("kubectl warren").name("kubectl warren");
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = parse_command_line();
    let bars = matches!(&cli.command, Command::Migrate(args) if progress_bars(args));
    init_tracing(cli.log_format, bars);
    match cli.command {
        Command::Migrate(args) => migrate(*args).await,
        Command::Status(args) => plugin(Plugin::Status, args).await,
        Command::Secrets(args) => plugin(Plugin::Secrets, args).await,
        Command::Pause(args) => plugin(Plugin::Pause, args).await,
        Command::Resume(args) => plugin(Plugin::Resume, args).await,
        Command::Crd => {
            print!("{}", warren::crds_yaml());
            std::process::ExitCode::SUCCESS
        }
        Command::Render { file, cluster_domain, operator_namespace } => {
            let outcome =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display())).and_then(|manifest| {
                    let settings = Settings { cluster_domain, operator_namespace: Some(operator_namespace) };
                    warren::render::render(&manifest, &settings).map_err(|e| format!("{}: {e}", file.display()))
                });
            match outcome {
                Ok(yaml) => {
                    print!("{yaml}");
                    std::process::ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("warren render: {message}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let client = match kube::Client::try_default().await {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "no Kubernetes client configuration");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let metrics = Metrics::default();
            let readiness = Readiness::default();
            let server = tokio::spawn(server::serve(args.listen, metrics.clone(), readiness.clone()));
            let ctx = Arc::new(Context::new(client.clone(), args.config(), metrics));
            let RunArgs { namespace, listen, lease_namespace, lease_name, identity, .. } = *args;
            let scope = WatchScope::from_names(namespace);
            tracing::info!(namespaces = %scope.describe(), %listen, "warren controller starting");
            let work = controller::run(ctx, scope, readiness.clone());
            let election = lease_namespace.filter(|ns| !ns.is_empty()).map(|namespace| Election {
                namespace,
                lease: lease_name,
                identity: identity.filter(|i| !i.is_empty()).unwrap_or_else(fallback_identity),
            });
            let controllers = async {
                match &election {
                    Some(election) => leader::lead(client, election, &readiness, work).await,
                    None => {
                        readiness.set(Phase::Syncing);
                        work.await;
                        Ok(())
                    }
                }
            };
            tokio::select! {
                outcome = controllers => match outcome {
                    Ok(()) => std::process::ExitCode::SUCCESS,
                    Err(error) => {
                        tracing::error!("{error}");
                        std::process::ExitCode::FAILURE
                    }
                },
                result = server => {
                    tracing::error!(?result, "the health and metrics server stopped");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
