/*
 * ZMTP 3.0 (ZeroMQ's wire protocol, RFC 23/ZMTP), NULL mechanism, spoken by the
 * native threads themselves over the ipc:// endpoint's Unix stream socket.
 *
 * Why not libzmq from C: every libzmq message crosses its I/O thread on both
 * sides, so one request/reply is six thread wake-ups; on this 2-vCPU VM a
 * ROUTER/DEALER round trip measured 227-238 us (p50) against 11 us for the same
 * exchange on a bare Unix socket. Speaking the protocol directly keeps the
 * endpoint a real ZeroMQ peer (a pyzmq DEALER talks to the page server, the
 * tests do exactly that) with two wake-ups per fault.
 */
#ifndef LAZYSHARE_ZMTP_H
#define LAZYSHARE_ZMTP_H

#include <stddef.h>
#include <stdint.h>

#define ZMTP_GREETING 64
#define ZMTP_MORE 0x01
#define ZMTP_LONG 0x02
#define ZMTP_COMMAND 0x04
/* Largest command or request frame either side accepts (READY is ~40 bytes). */
#define ZMTP_MAX_SMALL 1024

/* Our greeting: signature, version 3.0, mechanism NULL. */
void zmtp_greeting(uint8_t out[ZMTP_GREETING], int as_server);
/* 0 if a peer's greeting is one we can talk to (ZMTP 3.x, NULL), else -EPROTO. */
int zmtp_check_greeting(const uint8_t in[ZMTP_GREETING]);
/* A READY command frame announcing socket_type; returns its length. */
size_t zmtp_ready(uint8_t *out, size_t cap, const char *socket_type);
/* Encode a frame header for a body of len bytes; returns its length (2 or 9). */
size_t zmtp_frame_header(uint8_t out[9], uint8_t flags, uint64_t len);
/* Parse a frame header from buf[0..avail): returns its length, 0 if incomplete. */
size_t zmtp_parse_header(const uint8_t *buf, size_t avail, uint8_t *flags, uint64_t *len);

#endif
