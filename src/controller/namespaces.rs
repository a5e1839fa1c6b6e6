//! Which namespaces the operator runs in, and one watch per kind over several of them.
//!
//! A Role per namespace grants nothing cluster-wide, so neither may a watch span the cluster: a
//! watch per namespace, merged into the one event stream a reflector store takes. A store's
//! writer swaps in a whole list on `InitDone`, so the namespaces' own list phases cannot reach it
//! as they come (a second namespace's list would wipe the first's): the merge gives the store one
//! list, made of every namespace's first, and then turns a namespace's later re-list (after a
//! watch expired) into applies and the deletes of what it no longer holds.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;

use futures::{Stream, StreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::watcher::Event;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// The namespaces the operator runs RabbitClusters and RabbitMigrations in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace: needs a ClusterRole.
    Cluster,
    /// These namespaces only (at least one): a Role in each.
    Namespaces(Vec<String>),
}

impl WatchScope {
    /// From `--namespace` values: none means the whole cluster; duplicates and blanks dropped.
    pub fn from_names(names: impl IntoIterator<Item = String>) -> Self {
        let mut namespaces: Vec<String> = Vec::new();
        for name in names.into_iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()) {
            if !namespaces.contains(&name) {
                namespaces.push(name);
            }
        }
        if namespaces.is_empty() { Self::Cluster } else { Self::Namespaces(namespaces) }
    }

    /// For logs: `<all>` or the names, comma-separated.
    pub fn describe(&self) -> String {
        match self {
            Self::Cluster => "<all>".to_string(),
            Self::Namespaces(names) => names.join(","),
        }
    }

    /// One Api per watched namespace, or one for the whole cluster.
    fn apis<K>(&self, client: &Client) -> Vec<(Option<String>, Api<K>)>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
    {
        match self {
            Self::Cluster => vec![(None, Api::all(client.clone()))],
            Self::Namespaces(names) => {
                names.iter().map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns))).collect()
            }
        }
    }
}

type WatchEvent<K> = Result<Event<K>, watcher::Error>;

/// The watch of `K` over `scope`, each object as `slim` leaves it, as one stream for a store
/// (`reader` is that store: what a re-listed namespace no longer holds is deleted from it).
pub fn watch<K>(
    client: &Client,
    scope: &WatchScope,
    config: watcher::Config,
    slim: fn(&mut K),
    reader: Store<K>,
) -> stream::BoxStream<'static, WatchEvent<K>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    let mut apis = scope.apis::<K>(client);
    if apis.len() == 1 {
        let (_, api) = apis.remove(0);
        return watcher(api, config).default_backoff().modify(slim).boxed();
    }
    let namespaces: Vec<String> = apis.iter().filter_map(|(ns, _)| ns.clone()).collect();
    let watches = apis.into_iter().enumerate().map(|(index, (_, api))| {
        watcher(api, config.clone()).default_backoff().modify(slim).map(move |event| (index, event)).boxed()
    });
    merge(stream::select_all(watches), namespaces, reader)
}

/// Several namespaces' watches (each event tagged with its namespace's index) as one.
pub fn merge<K, S>(watches: S, namespaces: Vec<String>, reader: Store<K>) -> stream::BoxStream<'static, WatchEvent<K>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: Stream<Item = (usize, WatchEvent<K>)> + Send + 'static,
{
    let mut merged = Merged::new(namespaces, reader);
    watches
        .flat_map(move |(index, event)| {
            let out: Vec<WatchEvent<K>> = match event {
                Ok(event) => merged.step(index, event).into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            };
            stream::iter(out)
        })
        .boxed()
}

/// The merge's memory: until every namespace has listed once, the objects seen so far (given to
/// the store as one list); after, the names each re-listing namespace has sent.
struct Merged<K: Resource<DynamicType = ()> + 'static> {
    namespaces: Vec<String>,
    reader: Store<K>,
    /// Until every namespace has listed: which have, and what they hold.
    first_list: Option<FirstList<K>>,
    /// Per namespace, the names a re-list in progress has sent.
    relisting: Vec<Option<HashSet<String>>>,
}

/// The namespaces' first lists, gathered into one.
struct FirstList<K: Resource<DynamicType = ()> + 'static> {
    listed: Vec<bool>,
    objects: HashMap<ObjectRef<K>, K>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Merged<K> {
    fn new(namespaces: Vec<String>, reader: Store<K>) -> Self {
        let count = namespaces.len();
        Self {
            namespaces,
            reader,
            first_list: Some(FirstList { listed: vec![false; count], objects: HashMap::new() }),
            relisting: vec![None; count],
        }
    }

    fn step(&mut self, index: usize, event: Event<K>) -> Vec<Event<K>> {
        if let Some(FirstList { listed, objects }) = self.first_list.as_mut() {
            let namespace = &self.namespaces[index];
            match event {
                Event::Init => objects.retain(|key, _| key.namespace.as_deref() != Some(namespace)),
                Event::InitApply(object) | Event::Apply(object) => {
                    objects.insert(ObjectRef::from_obj(&object), object);
                }
                Event::Delete(object) => {
                    objects.remove(&ObjectRef::from_obj(&object));
                }
                Event::InitDone => listed[index] = true,
            }
            if !listed.iter().all(|done| *done) {
                return Vec::new();
            }
            let Some(FirstList { objects, .. }) = self.first_list.take() else { return Vec::new() };
            let mut out = vec![Event::Init];
            out.extend(objects.into_values().map(Event::InitApply));
            out.push(Event::InitDone);
            return out;
        }
        match event {
            Event::Init => {
                self.relisting[index] = Some(HashSet::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                if let Some(seen) = self.relisting[index].as_mut() {
                    seen.insert(object.name_any());
                }
                vec![Event::Apply(object)]
            }
            Event::InitDone => {
                let Some(seen) = self.relisting[index].take() else { return Vec::new() };
                let namespace = &self.namespaces[index];
                self.reader
                    .state()
                    .into_iter()
                    .filter(|object| object.namespace().as_deref() == Some(namespace))
                    .filter(|object| !seen.contains(&object.name_any()))
                    .map(|object| Event::Delete((*object).clone()))
                    .collect()
            }
            applied_or_deleted => vec![applied_or_deleted],
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::{self, store::Writer};

    use super::*;

    fn config_map(namespace: &str, name: &str) -> ConfigMap {
        let mut object = ConfigMap::default();
        object.metadata.namespace = Some(namespace.to_string());
        object.metadata.name = Some(name.to_string());
        object
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut names: Vec<String> =
            store.state().iter().map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())).collect();
        names.sort();
        names
    }

    /// Feeds one namespace's event through the merge into the store's writer.
    fn feed(merged: &mut Merged<ConfigMap>, writer: &mut Writer<ConfigMap>, index: usize, event: Event<ConfigMap>) {
        for out in merged.step(index, event) {
            writer.apply_watcher_event(&out);
        }
    }

    #[test]
    fn the_store_lists_once_every_namespace_has_listed_with_what_happened_meanwhile() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let mut merged = Merged::new(vec!["a".into(), "b".into()], store.clone());
        feed(&mut merged, &mut writer, 0, Event::Init);
        feed(&mut merged, &mut writer, 1, Event::Init);
        feed(&mut merged, &mut writer, 0, Event::InitApply(config_map("a", "one")));
        feed(&mut merged, &mut writer, 0, Event::InitApply(config_map("a", "gone")));
        feed(&mut merged, &mut writer, 0, Event::InitDone);
        // Namespace a watches on while b still lists: a create and a delete.
        feed(&mut merged, &mut writer, 0, Event::Apply(config_map("a", "two")));
        feed(&mut merged, &mut writer, 0, Event::Delete(config_map("a", "gone")));
        feed(&mut merged, &mut writer, 1, Event::InitApply(config_map("b", "one")));
        assert!(names(&store).is_empty(), "nothing before every namespace listed");
        feed(&mut merged, &mut writer, 1, Event::InitDone);
        assert_eq!(names(&store), ["a/one", "a/two", "b/one"]);
        // Later events reach the store as they come.
        feed(&mut merged, &mut writer, 1, Event::Apply(config_map("b", "two")));
        feed(&mut merged, &mut writer, 0, Event::Delete(config_map("a", "one")));
        assert_eq!(names(&store), ["a/two", "b/one", "b/two"]);
    }

    #[test]
    fn a_relisted_namespace_loses_what_it_no_longer_holds_and_the_others_keep_theirs() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let mut merged = Merged::new(vec!["a".into(), "b".into()], store.clone());
        for (index, namespace) in [(0, "a"), (1, "b")] {
            feed(&mut merged, &mut writer, index, Event::Init);
            feed(&mut merged, &mut writer, index, Event::InitApply(config_map(namespace, "kept")));
            feed(&mut merged, &mut writer, index, Event::InitApply(config_map(namespace, "deleted-unseen")));
            feed(&mut merged, &mut writer, index, Event::InitDone);
        }
        assert_eq!(names(&store).len(), 4);
        // Namespace a's watch expired; while it was away one object went and one came.
        feed(&mut merged, &mut writer, 0, Event::Init);
        feed(&mut merged, &mut writer, 0, Event::InitApply(config_map("a", "kept")));
        feed(&mut merged, &mut writer, 0, Event::InitApply(config_map("a", "new")));
        feed(&mut merged, &mut writer, 0, Event::InitDone);
        assert_eq!(names(&store), ["a/kept", "a/new", "b/deleted-unseen", "b/kept"]);
    }

    #[test]
    fn a_scope_from_flags_drops_blanks_and_repeats_and_none_means_the_cluster() {
        assert_eq!(WatchScope::from_names(Vec::<String>::new()), WatchScope::Cluster);
        assert_eq!(WatchScope::from_names(["".to_string()]), WatchScope::Cluster);
        assert_eq!(
            WatchScope::from_names(["a".to_string(), " b ".to_string(), "a".to_string()]),
            WatchScope::Namespaces(vec!["a".into(), "b".into()])
        );
    }
}
