//! A stub Kubernetes API server for pod awareness tests (there is no cluster here): it serves
//! `GET /api/v1/pods` as the API server does, a `PodList` for a list and a stream of
//! `{"type": "ADDED" | "MODIFIED" | "DELETED", "object": Pod}` lines for `?watch=true`, in the
//! API's own JSON, with resource versions. It records every request, so a test can check the
//! field selector that arrived. Plain HTTP on 127.0.0.1; one thread per connection.
//!
//! Also: the shape of a kubelet's cgroups ([`KubeletTree`]) under a test cgroup.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, Sender, channel},
    },
    thread,
    time::Duration,
};

use serde_json::{Value, json};

/// One request the stub received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: BTreeMap<String, String>,
}

#[derive(Default)]
struct State {
    /// Pods by UID, as the list returns them.
    pods: BTreeMap<String, Value>,
    resource_version: u64,
    watchers: Vec<Sender<String>>,
    requests: Vec<Request>,
}

/// The stub API server; stops accepting when dropped (open watches end with the test).
pub struct StubApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl StubApi {
    /// Serves `pods` (Pod objects, as from [`pod`]) on 127.0.0.1 of the test's own namespace.
    pub fn start(pods: Vec<Value>) -> StubApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the stub API server");
        StubApi::serve_on(listener, pods)
    }

    /// As [`StubApi::start`], on 127.0.0.1 of namespace `ns` (where a controller started with
    /// [`crate::EgressCmd`] runs).
    pub fn start_in(ns: &crate::LoopNs, pods: Vec<Value>) -> StubApi {
        let listener = crate::in_netns(ns, || {
            TcpListener::bind("127.0.0.1:0").expect("binding the stub API server")
        });
        StubApi::serve_on(listener, pods)
    }

    fn serve_on(listener: TcpListener, pods: Vec<Value>) -> StubApi {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            resource_version: 100,
            ..State::default()
        }));
        {
            let mut s = state.lock().unwrap();
            for p in pods {
                let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
                s.pods.insert(uid, p);
            }
        }
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        StubApi { addr, state }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Watches open now.
    pub fn watchers(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        // A sender whose connection ended has its receiver dropped.
        s.watchers.retain(|w| w.send(String::new()).is_ok());
        s.watchers.len()
    }

    /// Sends `ADDED`, `MODIFIED` or `DELETED` of `pod` to every open watch (and keeps the list
    /// in step), with the next resource version.
    pub fn event(&self, kind: &str, mut pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version.to_string();
        pod["metadata"]["resourceVersion"] = json!(rv);
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        if kind == "DELETED" {
            s.pods.remove(&uid);
        } else {
            s.pods.insert(uid, pod.clone());
        }
        let line = json!({"type": kind, "object": pod}).to_string() + "\n";
        s.watchers.retain(|w| w.send(line.clone()).is_ok());
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let req = Request {
        path: path.to_string(),
        query: query.clone(),
    };
    let mut conn = conn;
    if path != "/api/v1/pods" {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": format!("{path} not found")})
        .to_string();
        return respond(&mut conn, "404 Not Found", &body);
    }
    if query.get("watch").map(String::as_str) == Some("true") {
        let rx: Receiver<String> = {
            let mut s = state.lock().unwrap();
            s.requests.push(req);
            let (tx, rx) = channel();
            s.watchers.push(tx);
            rx
        };
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        conn.flush()?;
        // Ends like the API server's watches do (timeoutSeconds), and when the test is over.
        let timeout: u64 = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290);
        let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
        while std::time::Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.is_empty() => {}
                Ok(line) => {
                    write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
                    conn.flush()?;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        write!(conn, "0\r\n\r\n")?;
        return conn.flush();
    }
    let body = {
        let mut s = state.lock().unwrap();
        s.requests.push(req);
        json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": s.resource_version.to_string()},
            "items": s.pods.values().cloned().collect::<Vec<_>>(),
        })
        .to_string()
    };
    respond(&mut conn, "200 OK", &body)
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// A container of a test pod: its name and 64-hex runtime id.
pub struct Container<'a> {
    pub name: &'a str,
    pub id: &'a str,
}

/// A Pod object as the API server returns it (running, its containers started).
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    qos: &str,
    containers: &[Container<'_>],
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "100",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": name.split('-').next().unwrap_or(name)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{name}-rs"), "uid": "00000000-0000-0000-0000-000000000001",
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": node,
            "containers": containers.iter().map(|c| json!({"name": c.name, "image": "registry.example/app:1"})).collect::<Vec<_>>(),
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "qosClass": qos,
            "podIP": "10.244.1.7",
            "containerStatuses": containers.iter().map(|c| json!({
                "name": c.name,
                "containerID": format!("containerd://{}", c.id),
                "image": "registry.example/app:1",
                "imageID": "registry.example/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}},
            })).collect::<Vec<_>>(),
        },
    })
}

/// A kubelet-shaped cgroup tree (systemd driver) under a test cgroup: `kubepods.slice`, the QoS
/// slices, pod slices and containerd's container scopes. Removed on drop, deepest first (after
/// killing whatever is left in it); drop it before the test cgroup.
pub struct KubeletTree {
    /// `<test cgroup>/kubepods.slice`.
    pub root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl KubeletTree {
    pub fn new(under: &Path) -> KubeletTree {
        let root = under.join("kubepods.slice");
        mkdir(&root);
        KubeletTree {
            root: root.clone(),
            dirs: vec![root],
        }
    }

    /// The pod's slice (`besteffort`/`burstable`; anything else: guaranteed) and one scope per
    /// container id; returns the scopes' paths.
    pub fn pod(&mut self, uid: &str, qos: &str, container_ids: &[&str]) -> Vec<PathBuf> {
        let uid_ = uid.replace('-', "_");
        let parent = match qos {
            "besteffort" | "burstable" => {
                let q = self.root.join(format!("kubepods-{qos}.slice"));
                if !q.exists() {
                    mkdir(&q);
                    self.dirs.push(q.clone());
                }
                q.join(format!("kubepods-{qos}-pod{uid_}.slice"))
            }
            _ => self.root.join(format!("kubepods-pod{uid_}.slice")),
        };
        mkdir(&parent);
        self.dirs.push(parent.clone());
        container_ids
            .iter()
            .map(|id| {
                let c = parent.join(format!("cri-containerd-{id}.scope"));
                mkdir(&c);
                self.dirs.push(c.clone());
                c
            })
            .collect()
    }
}

fn mkdir(p: &Path) {
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
}

impl Drop for KubeletTree {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.kill"), "1");
        for d in self.dirs.iter().rev() {
            for _ in 0..250 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }
}
