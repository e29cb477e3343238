//! The models one inference thread keeps loaded: least recently used first
//! out, bounded by count and by the bytes their tensors take.

use std::time::Instant;

use tch::Device;
use uuid::Uuid;

use super::loading::{self, LoadedModel};
use super::{ModelSpec, ServeError};
use crate::telemetry;

/// Loaded models kept in memory, least recently used first out.
pub(super) struct ModelCache {
    capacity: usize,
    max_bytes: usize,
    device: Device,
    /// Most recently used last.
    entries: Vec<(Uuid, LoadedModel)>,
}

impl ModelCache {
    /// An empty cache holding at most `capacity` models (at least one) and
    /// `max_bytes` of their tensors (the model in use always stays).
    pub fn new(capacity: usize, max_bytes: usize, device: Device) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            device,
            entries: Vec::new(),
        }
    }

    /// The loaded model for `spec`, loading it (and evicting the least
    /// recently used) on a miss.
    pub fn get(&mut self, spec: &ModelSpec) -> Result<&LoadedModel, ServeError> {
        if let Some(pos) = self.entries.iter().position(|(id, _)| *id == spec.id) {
            let entry = self.entries.remove(pos);
            self.entries.push(entry);
            metrics::counter!(telemetry::MODEL_CACHE, "result" => "hit").increment(1);
        } else {
            metrics::counter!(telemetry::MODEL_CACHE, "result" => "load").increment(1);
            let started = Instant::now();
            let loaded = loading::load(spec, self.device).map_err(|reason| ServeError::Load {
                id: spec.id,
                reason,
            })?;
            let mut held: usize = self.entries.iter().map(|(_, m)| m.bytes).sum();
            while !self.entries.is_empty()
                && (self.entries.len() >= self.capacity || held + loaded.bytes > self.max_bytes)
            {
                let (id, evicted) = self.entries.remove(0);
                held -= evicted.bytes;
                tracing::info!(model_id = %id, "model evicted from the cache");
            }
            tracing::info!(model_id = %spec.id, ms = started.elapsed().as_millis() as u64, "model loaded");
            self.entries.push((spec.id, loaded));
        }
        Ok(&self.entries.last().expect("just pushed").1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::{self, Normalization};
    use crate::models::{self, Classifier};

    /// A randomly initialised checkpoint of `classes` outputs.
    fn checkpoint(dir: &std::path::Path, classes: usize) -> ModelSpec {
        let spec = models::find("mobilenet_v2").unwrap();
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        Classifier::new(&mut vs, spec, classes as i64, None).unwrap();
        let id = Uuid::new_v4();
        let path = dir.join(format!("{id}.safetensors"));
        vs.save(&path).unwrap();
        ModelSpec {
            id,
            checkpoint: path,
            backbone: spec.name.into(),
            labels: (0..classes).map(|i| format!("class{i}")).collect(),
            image_size: 64,
            stored_size: preprocess::STORED_SIZE,
            normalization: Normalization::IMAGENET,
            script: None,
        }
    }

    #[test]
    fn the_model_cache_is_bounded_by_memory_and_evicts_the_least_recent() {
        let dir = std::env::temp_dir().join(format!("model-cache-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let [a, b, c] = [3, 3, 3].map(|n| checkpoint(&dir, n));
        let one = loading::load(&a, Device::Cpu).unwrap().bytes;
        assert!(one > 8 * 1024 * 1024, "MobileNetV2 holds {one} bytes");
        let mut cache = ModelCache::new(10, one * 5 / 2, Device::Cpu);
        let held = |cache: &ModelCache| cache.entries.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        cache.get(&a).unwrap();
        cache.get(&b).unwrap();
        assert_eq!(held(&cache), [a.id, b.id]);
        cache.get(&a).unwrap(); // a is now the most recent
        cache.get(&c).unwrap(); // room for two: b goes
        assert_eq!(held(&cache), [a.id, c.id]);
        // The count bound applies too.
        cache.capacity = 1;
        cache.get(&b).unwrap();
        assert_eq!(held(&cache), [b.id]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
