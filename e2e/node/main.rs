//! Tier 4: RabbitClusters as pods running RabbitMQ on a real node (kubelet, containerd, CoreDNS,
//! local volumes; images built here), the operator installed by the chart and running in the
//! cluster. Run through `e2e/with-control-plane.sh --node`, one test at a time: `make test` does.

mod celery_on_node;
mod cluster_on_node;
mod day_two;
mod drain_on_node;
mod machine_loss_on_node;
mod migration_job;
mod observability;
mod rig;
mod spread_on_node;
mod tls_on_node;
