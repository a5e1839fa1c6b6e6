//! What a cluster of tier-2 nodes says through the management API, and the operator's broker
//! reconcile run against it: queues declared and awaited per generation (quorum members on 4.x,
//! synchronised mirrors on 3.x), leaders, members.

use std::time::Duration;

use super::rabbit_nodes::NodeCluster;
use super::wait::wait_for;

impl NodeCluster {
    /// GET of the management API of node `index`, as JSON.
    pub async fn api(&self, index: usize, path: &str) -> Result<serde_json::Value, String> {
        let url = format!("{}{path}", self.management_url(index));
        let response = self
            .http()
            .get(&url)
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("GET {path} on node {index}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("GET {path} on node {index}: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {path} on node {index}: {status} {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("GET {path} on node {index}: {e}"))
    }

    /// PUT of the management API of node `index`.
    pub async fn api_put(&self, index: usize, path: &str, body: serde_json::Value) -> Result<(), String> {
        self.api_send(reqwest::Method::PUT, index, path, body).await.map(drop)
    }

    /// POST of the management API of node `index` (a queue's `/get`), its answer as JSON.
    pub async fn api_post(
        &self,
        index: usize,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let text = self.api_send(reqwest::Method::POST, index, path, body).await?;
        serde_json::from_str(&text).map_err(|e| format!("POST {path} on node {index}: {e}"))
    }

    async fn api_send(
        &self,
        method: reqwest::Method,
        index: usize,
        path: &str,
        body: serde_json::Value,
    ) -> Result<String, String> {
        let response = self
            .http()
            .request(method.clone(), format!("{}{path}", self.management_url(index)))
            .basic_auth(&self.credentials.username, Some(&self.credentials.password))
            .json(&body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| format!("{method} {path} on node {index}: {e}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() { Ok(text) } else { Err(format!("{method} {path} on node {index}: {status} {text}")) }
    }

    /// The names of the nodes at `indexes`, sorted.
    pub fn names(&self, indexes: &[usize]) -> Vec<String> {
        let mut names: Vec<String> = indexes.iter().map(|&i| self.nodes[i].name.clone()).collect();
        names.sort();
        names
    }

    /// The operator's broker reconcile (its real code) against node `index`'s management API.
    pub async fn converge(&self, index: usize) -> warren::error::Result<warren::rabbitmq::broker::BrokerObservation> {
        self.converge_with(index, &self.cluster.high_availability).await
    }

    /// The broker reconcile with another HA spec than the cluster's.
    pub async fn converge_with(
        &self,
        index: usize,
        high_availability: &warren::api::HighAvailabilitySpec,
    ) -> warren::error::Result<warren::rabbitmq::broker::BrokerObservation> {
        let client = warren::rabbitmq::management::ManagementClient::with_ca(
            &self.management_url(index),
            &self.credentials.username,
            &self.credentials.password,
            self.ca(),
        )?;
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        warren::rabbitmq::broker::converge(&client, &self.names(&all), high_availability, &[]).await
    }

    /// Declares a durable classic queue through node `via` (so its master lives there) and waits
    /// until the other nodes `mirrors` hold synchronised mirrors of it.
    pub async fn declare_mirrored_queue(&self, via: usize, queue: &str, mirrors: &[usize]) {
        let path = format!("/api/queues/%2F/{queue}");
        self.api_put(via, &path, serde_json::json!({"durable": true})).await.expect("declare queue");
        let expected = self.names(mirrors);
        wait_for(&format!("queue {queue}: mirrors on {mirrors:?} synchronised"), Duration::from_secs(60), || async {
            let info = self.api(via, &path).await?;
            let synced = node_list(&info["synchronised_slave_nodes"]);
            if synced == expected && info["node"] == self.nodes[via].name.as_str() {
                Ok(())
            } else {
                Err(info.to_string())
            }
        })
        .await;
    }

    /// Whether this cluster's generation replicates queues as quorum queues (4.x) rather than by
    /// classic mirroring (3.x).
    pub fn quorum(&self) -> bool {
        self.cluster.image_version.is_some_and(|v| !v.has_classic_mirroring())
    }

    /// The generation's name, `3.10`, `4.0` or `4.3`, for messages.
    pub fn generation(&self) -> String {
        self.cluster.image_version.map(|v| format!("{}.{}", v.major, v.minor)).unwrap_or_default()
    }

    /// Declares a durable queue with no arguments through node `via`, as a client that knows
    /// nothing of HA would, and waits until it is replicated on the nodes `members`: by the vhost's
    /// default queue type (quorum) on 4.x, by the ha-all policy on 3.x.
    pub async fn declare_ha_queue(&self, via: usize, queue: &str, members: &[usize]) {
        let path = format!("/api/queues/%2F/{queue}");
        self.api_put(via, &path, serde_json::json!({"durable": true})).await.expect("declare queue");
        self.wait_replicated(via, queue, members, Some(0)).await;
    }

    /// Waits until `queue` has a copy on exactly the nodes `members`, each one online and in sync
    /// (quorum members online, or master and synchronised mirrors), holding `messages` if given. A
    /// queue that was drained may hold a few again: acks in flight when a consumer closes are not
    /// guaranteed, and their messages come back (at least once).
    pub async fn wait_replicated(
        &self,
        via: usize,
        queue: &str,
        members: &[usize],
        messages: Option<u64>,
    ) -> serde_json::Value {
        let path = format!("/api/queues/%2F/{queue}");
        let expected = self.names(members);
        let what = format!("queue {queue}: {messages:?} messages, replicated on {members:?}");
        wait_for(&what, Duration::from_secs(120), || async {
            let info = self.api(via, &path).await?;
            let copies = if self.quorum() {
                if info["type"] != "quorum" {
                    return Err(format!("not a quorum queue: {info}"));
                }
                let online = node_list(&info["online"]);
                if online != node_list(&info["members"]) {
                    return Err(format!("members not all online: {info}"));
                }
                online
            } else {
                let mut copies = node_list(&info["synchronised_slave_nodes"]);
                copies.extend(info["node"].as_str().map(str::to_string));
                copies.sort();
                copies
            };
            let count = messages.is_none_or(|m| info["messages"] == m);
            if copies == expected && count { Ok(info) } else { Err(info.to_string()) }
        })
        .await
    }

    /// The index of the node that leads `queue`: its quorum leader, or its classic master.
    pub async fn queue_leader(&self, via: usize, queue: &str) -> usize {
        let info = self.api(via, &format!("/api/queues/%2F/{queue}")).await.expect("queue");
        let leader = info["leader"].as_str().or_else(|| info["node"].as_str()).expect("leader or master node");
        self.index_of(leader)
    }

    /// Index of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }
}

/// A JSON list of node names, sorted.
pub fn node_list(value: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> =
        value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default();
    names.sort();
    names
}
