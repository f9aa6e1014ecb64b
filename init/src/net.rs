//! Network configuration over rtnetlink: loopback up, wait for eth0, give it
//! the `wrenn.ip` address, bring it up and add the default route.
//!
//! rtnetlink is asynchronous, so [`configure`] runs it on a single-threaded
//! tokio runtime that exists only for the duration of the call; the rest of
//! PID 1 stays plain synchronous code. Requests use "replace" semantics, so
//! configuring an already configured interface succeeds.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use thiserror::Error;

use crate::cmdline::Ipv4Cidr;
use crate::log::{debug, warning};

/// The interface the sandbox's address goes on.
pub const INTERFACE: &str = "eth0";
/// How long to wait for eth0 to appear after virtio_net loads.
pub const INTERFACE_WAIT: Duration = Duration::from_secs(5);
/// How long adding the default route is retried while the link settles.
const ROUTE_RETRY: Duration = Duration::from_secs(2);
/// Upper bound for the whole configuration, whatever the kernel does.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(25);

/// What to configure on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub address: Ipv4Cidr,
    pub gateway: Ipv4Addr,
}

/// A failed network setup step.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(io::Error),
    #[error("interface {name} did not appear within {waited:?}; is virtio_net loaded and a NIC attached? interfaces present: {present}")]
    NoInterface {
        name: String,
        waited: Duration,
        present: String,
    },
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        source: rtnetlink::Error,
    },
    #[error("network setup did not finish within {0:?}")]
    Timeout(Duration),
}

fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let action = action.into();
    move |source| NetError::Netlink { action, source }
}

/// Configures loopback and eth0, blocking until done or failed.
pub fn configure(config: NetConfig) -> Result<(), NetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(NetError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(OVERALL_TIMEOUT, configure_async(config))
            .await
            .map_err(|_| NetError::Timeout(OVERALL_TIMEOUT))?
    })
}

async fn configure_async(config: NetConfig) -> Result<(), NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    let driver = tokio::spawn(connection);
    let result = configure_links(&handle, config).await;
    driver.abort();
    result
}

async fn configure_links(handle: &Handle, config: NetConfig) -> Result<(), NetError> {
    // A broken loopback should not cost the sandbox its external network.
    if let Err(e) = loopback_up(handle).await {
        warning!("cannot bring lo up", error = e);
    }
    let eth = wait_for_link(handle, INTERFACE, INTERFACE_WAIT).await?;
    add_address(handle, eth, config.address).await?;
    set_up(handle, eth, INTERFACE).await?;
    add_default_route(handle, eth, config.gateway).await
}

async fn loopback_up(handle: &Handle) -> Result<(), NetError> {
    let lo = link_index(handle, "lo")
        .await?
        .ok_or_else(|| no_interface("lo", Duration::ZERO))?;
    set_up(handle, lo, "lo").await
}

/// Interface index by name, or `None` if there is no such interface.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut request = std::pin::pin!(handle.link().get().match_name(name).execute());
    match request.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("looking up interface {name}"))(e)),
    }
}

async fn wait_for_link(handle: &Handle, name: &str, timeout: Duration) -> Result<u32, NetError> {
    let started = tokio::time::Instant::now();
    loop {
        if let Some(index) = link_index(handle, name).await? {
            debug!("interface found", name = name, index = index);
            return Ok(index);
        }
        if started.elapsed() >= timeout {
            return Err(no_interface(name, timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), NetError> {
    let message = LinkUnspec::new_with_index(index).up().build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(netlink(format!("setting {name} up")))
}

async fn add_address(handle: &Handle, index: u32, cidr: Ipv4Cidr) -> Result<(), NetError> {
    handle
        .address()
        .add(index, IpAddr::V4(cidr.addr), cidr.prefix)
        .replace()
        .execute()
        .await
        .map_err(netlink(format!("adding address {cidr} to {INTERFACE}")))
}

/// Adds `default via gateway dev <index>`, retrying briefly while the kernel
/// still reports the gateway as unreachable (link not fully up yet).
async fn add_default_route(handle: &Handle, index: u32, gateway: Ipv4Addr) -> Result<(), NetError> {
    let started = tokio::time::Instant::now();
    loop {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        let result = handle.route().add(route).replace().execute().await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if is_transient(&e) && started.elapsed() < ROUTE_RETRY => {
                tokio::time::sleep(POLL).await
            }
            Err(e) => return Err(netlink(format!("adding default route via {gateway}"))(e)),
        }
    }
}

fn is_transient(error: &rtnetlink::Error) -> bool {
    matches!(
        errno_of(error),
        Some(libc::ENETUNREACH) | Some(libc::ENETDOWN)
    )
}

/// The positive errno carried by a netlink error reply, if any.
fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn no_interface(name: &str, waited: Duration) -> NetError {
    NetError::NoInterface {
        name: name.to_string(),
        waited,
        present: crate::log::list_dir(Path::new("/sys/class/net")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_message_names_it() {
        let err = NetError::NoInterface {
            name: "eth0".into(),
            waited: Duration::from_secs(5),
            present: crate::log::list_dir(Path::new("/nonexistent")),
        };
        assert_eq!(
            err.to_string(),
            "interface eth0 did not appear within 5s; is virtio_net loaded and a NIC attached? \
             interfaces present: none"
        );
    }
}
