//! Integration tests through the HTTP API, against real Postgres and real
//! libtorch. `scripts/setup` installs what they need (weights, photos).

mod backbones;
mod cluster;
mod connections;
mod console;
mod contract;
mod datasets;
mod disk;
mod fashion;
mod fencing;
mod freezing;
mod helpers;
mod hostile_archives;
mod hostile_input;
mod hostile_modules;
mod ingest;
mod jobs;
mod lifecycle;
mod operations;
mod outage;
mod pretrained;
mod processes;
mod queue;
mod scale_out;
mod script_backbones;
mod serving;
mod shared_store;
mod training;
