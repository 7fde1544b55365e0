//! Front-ends: everything that turns a transport's request into a job and
//! its answer back. The core never sees a socket or a topic.

//!
//! Public only where a tool or test drives a front-end's parser directly:
//! `openai::parse_request`, `mqtt::parse_job`, `unix` (the socket file).

pub(crate) mod conn;
mod fetch;
pub(crate) mod http;
pub(crate) mod link;
pub mod mqtt;
pub(crate) mod mqtt_client;
pub mod openai;
pub(crate) mod peer;
mod redelivery;
pub(crate) mod room;
pub(crate) mod topics;
pub mod unix;
