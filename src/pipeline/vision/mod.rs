//! Vision-language models (SmolVLM / Idefics3 layout): the parts built so
//! far. `processor` turns an image into the vision encoder's views and the
//! prompt text that stands for it, checked against transformers; the task
//! itself (three graphs, image features spliced into the embeddings, the
//! generation loop reused) is not wired up yet.
#![allow(dead_code)]

pub mod processor;
