//! A real mosquitto broker on a free loopback port, and a real MQTT 5 client
//! for the other side of the tests.
#![allow(dead_code)]

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process with persistence in a temporary folder.
pub struct Broker {
    pub port: u16,
    /// A second listener with TLS (mutual) and a password, when started with `start_tls`.
    pub tls: Option<TlsListener>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Log every connection (for tests that count them).
    verbose: bool,
}

/// What a client needs for the TLS listener.
pub struct TlsListener {
    pub port: u16,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub username: String,
    pub password_file: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A test CA (`ca.pem`) and certificates it signed for `localhost` and
/// 127.0.0.1: `server.pem`/`server.key` and `client.pem`/`client.key`.
pub fn make_certs(d: &std::path::Path) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=inferd test CA",
        ],
    );
    for (name, cn) in [("server", "localhost"), ("client", "inferd-client")] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        std::fs::write(d.join(format!("{name}.ext")), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn mosquitto() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mosquitto is installed (scripts/setup.sh installs it)")
}

impl Broker {
    /// Starts a broker on a free port.
    pub fn start() -> Broker {
        let mut b =
            Broker { port: free_port(), tls: None, dir: tempfile::tempdir().unwrap(), child: None, verbose: false };
        b.launch();
        b
    }

    /// Starts a broker that logs every connection.
    pub fn start_verbose() -> Broker {
        let mut b =
            Broker { port: free_port(), tls: None, dir: tempfile::tempdir().unwrap(), child: None, verbose: true };
        b.launch();
        b
    }

    /// Starts a broker with a plain anonymous listener (for the test client)
    /// and a TLS listener that wants a client certificate and a password.
    pub fn start_tls() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_certs(d);
        let passwd = d.join("passwd");
        let out = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["inferd", "s3cret-pass"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(d.join("password"), "s3cret-pass\n").unwrap();
        let tls = TlsListener {
            port: free_port(),
            ca: d.join("ca.pem"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            username: "inferd".into(),
            password_file: d.join("password"),
        };
        let mut b = Broker { port: free_port(), tls: Some(tls), dir, child: None, verbose: false };
        b.launch();
        b
    }

    /// The broker's log file (verbose with TEST_BROKER_LOG set).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let d = self.dir.path().display();
        let mut text = format!(
            "per_listener_settings true\npersistence true\npersistence_location {d}/\nuser root\n\
             max_queued_messages 10000\nlog_dest file {d}/mosquitto.log\nlog_type {}\n\
             listener {} 127.0.0.1\nallow_anonymous true\n",
            if self.verbose || std::env::var_os("TEST_BROKER_LOG").is_some() { "all" } else { "error" },
            self.port,
        );
        if let Some(tls) = &self.tls {
            text.push_str(&format!(
                "listener {} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\ncafile {d}/ca.pem\n\
                 certfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\n",
                tls.port
            ));
        }
        std::fs::write(&conf, text).unwrap();
        let child =
            Command::new(mosquitto()).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL for inferd's configuration.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker cleanly (it saves its sessions and queued messages).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill with a pid of our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Stops and starts the broker again on the same port, with its saved state.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A message the test client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub correlation: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.payload)))
    }
}

/// A real MQTT 5 client with a persistent session, polled on its own task.
pub struct TestClient {
    pub client: AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<Received>,
    /// PUBACKs received: publishes the broker has taken.
    pub acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestClient {
    pub async fn connect(broker: &Broker, id: &str) -> TestClient {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port);
        o.set_clean_start(false).set_session_expiry_interval(Some(600)).set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(Some(64 << 20));
        let (client, mut events) = AsyncClient::new(o, 1000);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acks = acked.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let correlation =
                            p.properties.as_ref().and_then(|pr| pr.correlation_data.as_ref()).map(|c| c.to_vec());
                        let user_properties =
                            p.properties.as_ref().map(|pr| pr.user_properties.clone()).unwrap_or_default();
                        let r = Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            correlation,
                            user_properties,
                        };
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        TestClient { client, rx, acked }
    }

    pub async fn subscribe(&self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await.unwrap();
    }

    pub async fn publish_v5(&self, topic: &str, payload: impl Into<Vec<u8>>, response_topic: &str, correlation: &[u8]) {
        let props = PublishProperties {
            response_topic: Some(response_topic.into()),
            correlation_data: Some(correlation.to_vec().into()),
            user_properties: vec![("camera".into(), "7".into())],
            ..Default::default()
        };
        self.client.publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props).await.unwrap();
    }

    /// Publishes with MQTT 5 user properties (a camera's raw image and its question).
    pub async fn publish_with_user_properties(&self, topic: &str, payload: impl Into<Vec<u8>>, user: &[(&str, &str)]) {
        let props = PublishProperties {
            user_properties: user.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        self.client.publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props).await.unwrap();
    }

    /// The next message, or a panic after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Received {
        tokio::time::timeout(timeout, self.rx.recv()).await.expect("no MQTT message in time").expect("client stopped")
    }

    /// The next message on `topic`, skipping others.
    /// A streamed generation's answer for job `id`: the text of its partial
    /// messages, joined, and the result that comes last.
    pub async fn recv_generation(&mut self, id: &str, timeout: Duration) -> (String, serde_json::Value) {
        let mut partial = String::new();
        loop {
            let m = self.recv(timeout).await.json();
            assert_eq!(m["id"], id, "{m}");
            if m["partial"] != true {
                return (partial, m);
            }
            partial.push_str(m["text"].as_str().unwrap());
        }
    }

    pub async fn recv_on(&mut self, topic: &str, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.recv(left).await;
            if r.topic == topic {
                return r;
            }
        }
    }
}
