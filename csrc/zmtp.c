/* ZMTP 3.0 framing shared by the page server and the fault handler (see
 * zmtp.h): pure functions over caller buffers, called from their threads. */
#include "zmtp.h"

#include <errno.h>
#include <string.h>

void zmtp_greeting(uint8_t out[ZMTP_GREETING], int as_server)
{
    memset(out, 0, ZMTP_GREETING);
    out[0] = 0xFF;
    out[8] = 0x01; /* padding carries length+1 for ZMTP 1.0 peers, as libzmq does */
    out[9] = 0x7F;
    out[10] = 3; /* version 3.0 */
    out[11] = 0;
    memcpy(out + 12, "NULL", 4);
    out[32] = as_server ? 1 : 0;
}

int zmtp_check_greeting(const uint8_t in[ZMTP_GREETING])
{
    static const uint8_t null_mech[20] = {'N', 'U', 'L', 'L'};
    if (in[0] != 0xFF || in[9] != 0x7F || in[10] < 3)
        return -EPROTO;
    if (memcmp(in + 12, null_mech, sizeof null_mech))
        return -EPROTO;
    return 0;
}

size_t zmtp_frame_header(uint8_t out[9], uint8_t flags, uint64_t len)
{
    if (len <= 255) {
        out[0] = flags;
        out[1] = (uint8_t)len;
        return 2;
    }
    out[0] = flags | ZMTP_LONG;
    for (int i = 0; i < 8; i++)
        out[1 + i] = (uint8_t)(len >> (56 - 8 * i));
    return 9;
}

size_t zmtp_parse_header(const uint8_t *buf, size_t avail, uint8_t *flags, uint64_t *len)
{
    if (avail < 2)
        return 0;
    *flags = buf[0];
    if (!(buf[0] & ZMTP_LONG)) {
        *len = buf[1];
        return 2;
    }
    if (avail < 9)
        return 0;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | buf[1 + i];
    *len = v;
    return 9;
}

size_t zmtp_ready(uint8_t *out, size_t cap, const char *socket_type)
{
    static const char key[] = "Socket-Type";
    size_t tlen = strlen(socket_type);
    size_t body = 1 + 5 + 1 + (sizeof key - 1) + 4 + tlen;
    if (body > 255 || body + 2 > cap)
        return 0;
    uint8_t *p = out;
    *p++ = ZMTP_COMMAND;
    *p++ = (uint8_t)body;
    *p++ = 5;
    memcpy(p, "READY", 5);
    p += 5;
    *p++ = (uint8_t)(sizeof key - 1);
    memcpy(p, key, sizeof key - 1);
    p += sizeof key - 1;
    *p++ = 0;
    *p++ = 0;
    *p++ = 0;
    *p++ = (uint8_t)tlen;
    memcpy(p, socket_type, tlen);
    p += tlen;
    return (size_t)(p - out);
}
