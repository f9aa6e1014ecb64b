//! Links, addresses and routes over rtnetlink.
//!
//! rtnetlink is asynchronous; [`Netlink`] wraps one connection and a
//! current-thread tokio runtime that exists for one batch of work and offers
//! blocking calls. The netlink socket belongs to the namespace of the thread
//! that opens it, so open a [`Netlink`] on a thread that is already in the
//! namespace to configure (see `netns::run_in`), and use it on that thread.
//! Addresses and routes are added with "replace" semantics, so repeating a
//! step is harmless.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::runtime::Runtime;

use super::NetError;

/// One rtnetlink connection in the current thread's network namespace.
pub struct Netlink {
    runtime: Runtime,
    handle: Handle,
    /// Says where errors happened: "slot 5" or "host".
    scope: String,
}

impl Netlink {
    /// Opens a connection in the current thread's namespace; `scope` prefixes
    /// error messages.
    pub fn open(scope: impl Into<String>) -> Result<Self, NetError> {
        let scope = scope.into();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| NetError::Runtime {
                scope: scope.clone(),
                source,
            })?;
        // The socket is made here, in this thread's namespace; it needs the
        // runtime's reactor to register with.
        let opened = runtime.block_on(async { rtnetlink::new_connection() });
        let (connection, handle, _) = opened.map_err(|source| NetError::NetlinkSocket {
            scope: scope.clone(),
            source,
        })?;
        runtime.spawn(connection);
        Ok(Netlink {
            runtime,
            handle,
            scope,
        })
    }

    fn run<T>(
        &self,
        action: impl FnOnce() -> String,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetError> {
        self.runtime
            .block_on(request)
            .map_err(|source| NetError::Netlink {
                scope: self.scope.clone(),
                action: action(),
                source,
            })
    }

    /// Index of the link `name`, or `None` if there is none.
    pub fn link_index(&self, name: &str) -> Result<Option<u32>, NetError> {
        let request = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let lookup = self.runtime.block_on(async move {
            let mut request = std::pin::pin!(request);
            request.try_next().await
        });
        match lookup {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(NetError::Netlink {
                scope: self.scope.clone(),
                action: format!("looking up link {name}"),
                source,
            }),
        }
    }

    /// Index of the link `name`, which must exist.
    pub fn require_link(&self, name: &str) -> Result<u32, NetError> {
        self.link_index(name)?.ok_or_else(|| NetError::LinkMissing {
            scope: self.scope.clone(),
            name: name.to_string(),
        })
    }

    /// Names of every link in the namespace.
    pub fn link_names(&self) -> Result<Vec<String>, NetError> {
        let request = self.handle.link().get().execute();
        let links = self.run(|| "listing links".to_string(), async move {
            request.try_collect::<Vec<_>>().await
        })?;
        Ok(links
            .into_iter()
            .filter_map(|link| {
                link.attributes.into_iter().find_map(|attr| match attr {
                    LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                })
            })
            .collect())
    }

    /// Sets link `index` (called `name` in errors) up.
    pub fn set_up(&self, index: u32, name: &str) -> Result<(), NetError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.run(
            || format!("setting {name} up"),
            self.handle.link().set(message).execute(),
        )
    }

    /// Puts `addr/prefix` on link `index` (called `name` in errors).
    pub fn add_address(
        &self,
        index: u32,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        self.run(
            || format!("adding address {addr}/{prefix} to {name}"),
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), prefix)
                .replace()
                .execute(),
        )
    }

    /// Adds or replaces the route `dest/prefix via gateway dev index`.
    pub fn add_route(
        &self,
        dest: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        index: u32,
        name: &str,
    ) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .gateway(gateway)
            .output_interface(index)
            .build();
        self.run(
            || format!("adding route {dest}/{prefix} via {gateway} dev {name}"),
            self.handle.route().add(route).replace().execute(),
        )
    }

    /// Creates the veth pair `name` (here) and `peer` (created directly in
    /// the namespace `peer_netns`, so its name never clashes with a link of
    /// this namespace).
    pub fn add_veth_into(
        &self,
        name: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
    ) -> Result<(), NetError> {
        let peer_message = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let message = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.run(
            || format!("creating veth pair {name} / {peer}"),
            self.handle.link().add(message).execute(),
        )
    }

    /// Deletes the link `name`; returns whether there was one. Deleting one
    /// end of a veth pair deletes both, and routes through it go with it.
    pub fn delete_link(&self, name: &str) -> Result<bool, NetError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let deleted = self
            .runtime
            .block_on(self.handle.link().del(index).execute());
        match deleted {
            Ok(()) => Ok(true),
            // Gone in between: someone else deleted it (its peer, say).
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(NetError::Netlink {
                scope: self.scope.clone(),
                action: format!("deleting link {name}"),
                source,
            }),
        }
    }
}

/// The positive errno carried by a netlink error reply, if any.
fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}
