//! The SHA-256 of a download, computed on a thread of its own from the
//! buffers the download loop has just written to disk, so that hashing
//! (about 2 GB/s with the CPU's SHA extensions, far less without) overlaps
//! the network and the disk instead of adding to them. Memory is bounded: a
//! fixed set of buffers circulates between the loop and the hasher, so a
//! slow hasher slows the reader down; it never queues more.

use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::{Digest, Sha256};
use std::io;
use std::thread::{self, JoinHandle};

/// Buffers in circulation (each `buf_size` bytes).
const BUFFERS: usize = 4;

enum Msg {
    Data(Vec<u8>, usize),
    /// Forget everything hashed so far (the file restarts from byte 0).
    Reset,
}

pub struct HashPipe {
    to_hasher: Option<Sender<Msg>>,
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<Sha256>>,
}

/// The hasher thread is gone (it panicked).
pub struct HasherGone;

impl HashPipe {
    pub fn start(buf_size: usize) -> io::Result<HashPipe> {
        let (to_hasher, from_loop) = bounded::<Msg>(BUFFERS);
        let (spare_tx, spare) = bounded(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = spare_tx.send(vec![0u8; buf_size]);
        }
        let thread = thread::Builder::new()
            .name("download-hash".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for msg in from_loop {
                    match msg {
                        Msg::Data(buf, n) => {
                            h.update(&buf[..n]);
                            let _ = spare_tx.send(buf);
                        }
                        Msg::Reset => h = Sha256::new(),
                    }
                }
                h
            })?;
        Ok(HashPipe {
            to_hasher: Some(to_hasher),
            spare,
            thread: Some(thread),
        })
    }

    /// A buffer to read into; waits while every buffer is being hashed.
    pub fn buffer(&self) -> Result<Vec<u8>, HasherGone> {
        self.spare.recv().map_err(|_| HasherGone)
    }

    /// Hashes `buf[..n]` (after the data sent before), then recycles `buf`.
    pub fn hash(&self, buf: Vec<u8>, n: usize) -> Result<(), HasherGone> {
        self.send(Msg::Data(buf, n))
    }

    pub fn reset(&self) -> Result<(), HasherGone> {
        self.send(Msg::Reset)
    }

    fn send(&self, msg: Msg) -> Result<(), HasherGone> {
        match &self.to_hasher {
            Some(tx) => tx.send(msg).map_err(|_| HasherGone),
            None => Err(HasherGone),
        }
    }

    /// The hex digest of everything hashed since the last reset.
    pub fn finish(mut self) -> Result<String, HasherGone> {
        self.to_hasher = None;
        let h = self
            .thread
            .take()
            .ok_or(HasherGone)?
            .join()
            .map_err(|_| HasherGone)?;
        Ok(super::disk::hex(&h.finalize()))
    }
}

impl Drop for HashPipe {
    fn drop(&mut self) {
        // Ends the thread (the loop may have left early with an error).
        self.to_hasher = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hash_like_the_whole_and_reset_forgets() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let pipe = HashPipe::start(1000).ok().unwrap();
        let mut junk = pipe.buffer().ok().unwrap();
        junk[0] = 7;
        pipe.hash(junk, 1).ok().unwrap();
        pipe.reset().ok().unwrap();
        for piece in data.chunks(777) {
            let mut buf = pipe.buffer().ok().unwrap();
            buf[..piece.len()].copy_from_slice(piece);
            pipe.hash(buf, piece.len()).ok().unwrap();
        }
        let want = super::super::disk::hex(&Sha256::digest(&data));
        assert_eq!(pipe.finish().ok().unwrap(), want);
    }
}
