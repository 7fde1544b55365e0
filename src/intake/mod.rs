//! Front-ends: everything that turns a transport's request into a job and
//! its answer back. The core never sees a socket or a topic.

pub mod conn;
pub mod http;
pub(crate) mod link;
pub mod mqtt;
mod mqtt_client;
pub mod openai;
pub mod peer;
pub(crate) mod redelivery;
pub mod topics;
pub mod unix;
